"""N episodes of the seed-lifecycle task with their hosts trained as one computation:
``LifecycleBatch`` (what the single env, N = 1, and the vector env share) and
``SeedLifecycleVectorEnv``, the gymnasium vector env that ``make_vector_env("memrl/
SeedLifecycle", N)`` builds.

Per env, everything is the single env's: its lifecycle rules (``Lifecycle``), its random
streams (the reset seed's generator draws the torch seed of the host's weights and of its
minibatch order, then one torch seed per GERMINATE), its observations, rewards and ``info``.
Only the training is shared: one grouped computation per layer for all hosts (``HostBatch``).
So env i of ``SeedLifecycleVectorEnv`` plays as ``SeedLifecycleEnv`` reset with the same seed,
up to float summation order (a grouped convolution adds in another order than a lone one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from memrl.envs.lifecycle_host import HostBatch, load_dataset
from memrl.envs.lifecycle_rules import (
    Lifecycle,
    Op,
    SeedLifecycleConfig,
    feature_names,
    reward_terms,
)


@contextlib.contextmanager
def _host_training(num_threads: int) -> Iterator[None]:
    """Autograd on, whatever the caller's mode (a PPO rollout steps its envs under
    ``torch.inference_mode``), and ``num_threads`` torch threads (by default one: deterministic,
    every env bit-identical to its single env, and no oversubscription across env processes);
    the caller's thread count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_num_threads(before)


class LifecycleBatch:
    """N episodes of the task (see the module docstring). ``reset`` and ``step`` take the rows
    (env indices) they apply to and return one result per row."""

    def __init__(self, config: SeedLifecycleConfig, num_envs: int) -> None:
        self.config = config
        self.feature_names = feature_names(config.obs_mode, config.blueprints)
        self.data = load_dataset(config.dataset, config.data_dir, config.max_train)
        self.hosts = HostBatch(num_envs, self.data, config.widths, config.lr, config.batch_size)
        self.lifecycles = [Lifecycle(config, self.hosts.host_params) for _ in range(num_envs)]
        self.rngs: list[np.random.Generator | None] = [None] * num_envs
        self.shuffles: list[torch.Generator | None] = [None] * num_envs
        self.action_space = spaces.MultiDiscrete([len(Op), len(config.blueprints)])
        n = len(self.feature_names)
        self.observation_space = spaces.Box(-np.inf, np.inf, (n,), np.float32)

    def reset(
        self, rows: Sequence[int], rngs: Sequence[np.random.Generator]
    ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """New episodes in ``rows``, each drawing from its generator (kept for its germinations):
        (observation, info) per row."""
        with _host_training(self.config.num_threads):
            for row, rng in zip(rows, rngs, strict=True):
                torch_seed = int(rng.integers(2**31))
                self.rngs[row] = rng
                self.shuffles[row] = torch.Generator().manual_seed(torch_seed)
                self.hosts.reset(row, torch_seed)
            val_loss, val_acc = self.hosts.evaluate(rows, [[] for _ in rows])
        out = []
        for j, row in enumerate(rows):
            lifecycle = self.lifecycles[row]
            lifecycle.restart(float(val_loss[j]), float(val_acc[j]))
            out.append((lifecycle.observation(self.feature_names), lifecycle.info()))
        return out

    def step(
        self, rows: Sequence[int], actions: np.ndarray
    ) -> list[tuple[np.ndarray, float, bool, dict[str, Any]]]:
        """One epoch for ``rows`` with ``actions`` (len(rows), 2), each already checked against
        the action space: (observation, reward, terminated, info) per row."""
        lifecycles = [self.lifecycles[row] for row in rows]
        invalid = [
            not lc.is_valid(op, bp) for lc, (op, bp) in zip(lifecycles, actions, strict=True)
        ]
        with _host_training(self.config.num_threads):
            for row, (op, blueprint), skip in zip(rows, actions, invalid, strict=True):
                if not skip:  # a masked action acts as WAIT
                    self._apply(row, Op(op), blueprint)
                self.lifecycles[row].advance()
            seeds = [lifecycle.host_seeds() for lifecycle in lifecycles]
            shuffles = [self.shuffles[row] for row in rows]
            train_loss, train_acc = self.hosts.train_epoch(rows, seeds, shuffles)
            val_loss, val_acc = self.hosts.evaluate(rows, seeds)
            switched = [lifecycle.counterfactual_seeds() for lifecycle in lifecycles]
            asked = [j for j, s in enumerate(switched) if s is not None]
            if asked:
                _, acc = self.hosts.evaluate([rows[j] for j in asked], [switched[j] for j in asked])
            counterfactual = dict(zip(asked, acc, strict=True)) if asked else {}
        out, c = [], self.config
        for j, lifecycle in enumerate(lifecycles):
            previous_acc = lifecycle.metrics["val_acc"]
            lifecycle.end_epoch(
                (float(train_loss[j]), float(train_acc[j])),
                (float(val_loss[j]), float(val_acc[j])),
                float(counterfactual[j]) if j in counterfactual else None,
            )
            terms = reward_terms(
                c.reward_weights,
                lifecycle.metrics["val_acc"],
                previous_acc,
                lifecycle.params_added() / lifecycle.host_params,
                c.max_epochs,
                germinated=not invalid[j] and actions[j][0] == Op.GERMINATE,
                invalid=invalid[j],
            )
            info = lifecycle.info()
            info["reward_terms"], info["invalid_action"] = terms, invalid[j]
            terminated = lifecycle.epoch >= c.max_epochs
            if terminated:
                info["episode"] = lifecycle.episode()
            obs = lifecycle.observation(self.feature_names)
            out.append((obs, float(sum(terms.values())), terminated, info))
        return out

    def _apply(self, row: int, op: Op, blueprint: int) -> None:
        lifecycle = self.lifecycles[row]
        if op == Op.GERMINATE:
            slot, torch_seed = lifecycle.free_slot(), int(self.rngs[row].integers(2**31))
            name = self.config.blueprints[blueprint]
            lifecycle.germinate(slot, blueprint, self.hosts.germinate(row, slot, name, torch_seed))
        elif op == Op.FOSSILIZE:
            lifecycle.fossilize()
        elif op == Op.CULL:
            lifecycle.cull()


class SeedLifecycleVectorEnv(VectorEnv):
    """``num_envs`` seed-lifecycle envs (``SeedLifecycleEnv``'s options as keywords), their
    hosts trained as one computation, in this process on one thread. It behaves as gymnasium's
    ``SyncVectorEnv`` of single envs: the same autoreset modes, ``info`` layout (``action_mask``
    stacked (N, 4 + len(blueprints)), ``final_obs`` / ``final_info`` in SAME_STEP mode) and
    ``reset(seed=..., options={"reset_mask": ...})``. ``seeds``: per env, the seed of its first
    reset when that reset passes none (as ``make_env``'s ``seed``)."""

    def __init__(
        self,
        num_envs: int,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        seeds: Sequence[int | None] | None = None,
        **options: Any,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}; expected at least 1")
        self.config = SeedLifecycleConfig(**options)
        self.num_envs = num_envs
        self.batch = LifecycleBatch(self.config, num_envs)
        self.feature_names = self.batch.feature_names
        self.single_observation_space = self.batch.observation_space
        self.single_action_space = self.batch.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {"render_modes": [], "autoreset_mode": self.autoreset_mode}
        self.render_mode = None
        seeds = [None] * num_envs if seeds is None else list(seeds)
        if len(seeds) != num_envs:
            raise ValueError(f"{len(seeds)} seeds for num_envs={num_envs}; expected one per env")
        self._first_seeds = seeds
        self._obs = np.zeros((num_envs, *self.single_observation_space.shape), np.float32)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._started = np.zeros(num_envs, dtype=bool)

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Resets every env, or those of ``options["reset_mask"]`` ((N,) bool). ``seed``: None,
        an int (env i gets seed + i) or one seed (or None) per env."""
        n = self.num_envs
        if seed is None:
            seed = [None] * n
        elif isinstance(seed, int):
            seed = [seed + i for i in range(n)]
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for num_envs={n}; expected one per env")
        mask = np.ones(n, dtype=bool)
        if options is not None and "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray) or mask.shape != (n,) or mask.dtype != np.bool_:
                raise ValueError(
                    f"options['reset_mask']={mask!r}; expected a numpy bool array of shape ({n},)"
                )
            if not mask.any():
                raise ValueError("options['reset_mask'] is all False; expected at least one True")
        rows = np.flatnonzero(mask).tolist()
        infos: dict[str, Any] = {}
        for row, (obs, info) in zip(
            rows, self._reset_rows(rows, [seed[r] for r in rows]), strict=True
        ):
            self._obs[row] = obs
            infos = self._add_info(infos, info, row)
        self._autoreset[rows] = False
        return self._obs.copy(), infos

    def _reset_rows(self, rows: list[int], seeds: list[int | None]):
        rngs = []
        for row, s in zip(rows, seeds, strict=True):
            if s is None and self._first_seeds[row] is not None:
                s = self._first_seeds[row]
            self._first_seeds[row] = None
            rng = self.batch.rngs[row]
            if s is not None or rng is None:  # as gymnasium.Env.reset: keep the generator
                rng, _ = seeding.np_random(s)
            rngs.append(rng)
        self._started[rows] = True
        return self.batch.reset(rows, rngs)

    def step(self, actions):
        """One epoch of every env, all hosts trained as one computation; in NEXT_STEP mode an env
        that ended on the previous call only resets (reward 0), as gymnasium's vector envs."""
        n = self.num_envs
        actions = np.asarray(actions)
        if actions.shape != self.action_space.shape or not self.action_space.contains(
            actions.astype(np.int64)
        ):
            raise ValueError(
                f"actions={actions.tolist()}; expected (operation, blueprint) per env in "
                f"{self.action_space}"
            )
        if not self._started.all():
            raise RuntimeError("step() before reset(); call reset() first")
        actions = actions.astype(np.int64)
        restarting = self._autoreset.copy()
        if self.autoreset_mode == AutoresetMode.DISABLED and restarting.any():
            raise RuntimeError(
                f"envs {np.flatnonzero(restarting).tolist()} ended and autoreset is disabled; "
                "reset them (options={'reset_mask': ...}) before stepping"
            )
        if self.autoreset_mode != AutoresetMode.NEXT_STEP:
            restarting[:] = False
        stepping = np.flatnonzero(~restarting).tolist()
        rewards = np.zeros(n, dtype=np.float64)
        terminations = np.zeros(n, dtype=bool)
        results: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        if stepping:
            for row, (obs, reward, terminated, info) in zip(
                stepping, self.batch.step(stepping, actions[stepping]), strict=True
            ):
                results[row], rewards[row], terminations[row] = (obs, info), reward, terminated
        restarted = np.flatnonzero(restarting).tolist()
        finals = {}
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            restarted = np.flatnonzero(terminations).tolist()
            finals = {row: results[row] for row in restarted}
        if restarted:
            reset = self._reset_rows(restarted, [None] * len(restarted))
            results.update(zip(restarted, reset, strict=True))
        infos: dict[str, Any] = {}
        for row in range(n):
            if row in finals:
                final_obs, final_info = finals[row]
                infos = self._add_info(
                    infos, {"final_obs": final_obs, "final_info": final_info}, row
                )
            self._obs[row], info = results[row]
            infos = self._add_info(infos, info, row)
        self._autoreset = terminations.copy()
        truncations = np.zeros(n, dtype=bool)
        return self._obs.copy(), rewards, terminations, truncations, infos
