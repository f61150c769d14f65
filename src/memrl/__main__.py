from memrl.cli import main

raise SystemExit(main())
