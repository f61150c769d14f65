from torch.distributed.elastic.multiprocessing.errors import record

from memrl.cli import main

# record: under torchrun, a rank's uncaught exception is reported as the job's root cause
raise SystemExit(record(main)())
