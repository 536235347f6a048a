"""Model roles at run time: an engine per role, built from the config on first use, with per-item
seeds and token accounting.

Each HTTP role gets its own OpenAIEngine (its own concurrency bound, and usage that belongs to the
role alone). In-process roles (`model_dir`) share one HFEngine per model directory and run one
conversation at a time, so that each item's seeded samples do not depend on its batch neighbours.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Sequence

from zoomless.engines.base import Conversation, Engine, Generation, SamplingParams
from zoomless.synth.config import Endpoint, Role, SynthConfig, SynthError

USAGE_KEYS = ("requests", "retries", "errors", "prompt_tokens", "completion_tokens")


class RoleClient:
    """One role: generate(conversations, seeds, n) -> n generations per conversation, in order."""

    def __init__(self, name: str, path: str, role: Role, endpoint: Endpoint, engine: Engine, http: bool):
        self.name = name  # "questioner", "teacher1", ...
        self.path = path  # where it is configured, for messages: "roles.teachers[0]"
        self.endpoint = endpoint
        self.engine = engine
        self.http = http
        self.params = SamplingParams(max_new_tokens=role.max_new_tokens, temperature=role.temperature, top_p=role.top_p)
        self._pool = ThreadPoolExecutor(endpoint.max_concurrency, thread_name_prefix=name) if http else None
        self._local = dict.fromkeys(USAGE_KEYS, 0)  # in-process accounting
        self._logged = dict.fromkeys(USAGE_KEYS, 0)

    @property
    def where(self) -> str:
        e = self.endpoint
        return f"{e.base_url}, model {e.model!r}" if self.http else f"in-process {e.model_dir}"

    def generate(self, conversations: Sequence[Conversation], seeds: Sequence[int], n: int) -> list[list[Generation]]:
        def one(conv: Conversation, seed: int) -> list[Generation]:
            return self.engine.generate([conv], replace(self.params, n=n, seed=seed))[0]

        if self._pool is not None:
            return list(self._pool.map(one, conversations, seeds))
        out = []
        for conv, seed in zip(conversations, seeds):
            gens = one(conv, seed)
            self._local["requests"] += 1
            self._local["completion_tokens"] += sum(len(g.token_ids) for g in gens)
            self._local["errors"] += any(g.error for g in gens)
            out.append(gens)
        return out

    def usage(self) -> dict[str, int]:
        source = getattr(self.engine, "usage", None) if self.http else self._local
        return {k: int((source or {}).get(k, 0)) for k in USAGE_KEYS}

    def usage_delta(self) -> dict[str, int]:
        """Usage since the last call (what to log after a batch)."""
        now = self.usage()
        delta = {k: now[k] - self._logged[k] for k in USAGE_KEYS}
        self._logged = now
        return delta

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.http:
            self.engine.close()


class Roles:
    """Builds role clients on first use; `close()` shuts their engines down."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self._clients: dict[str, RoleClient] = {}
        self._hf: dict[str, Engine] = {}

    def _spec(self, name: str) -> tuple[str, Role]:
        roles = self.cfg.roles
        names = roles.teacher_names()
        if name in names:
            i = names.index(name)
            return f"roles.teachers[{i}]", roles.teachers[i]
        return f"roles.{name}", getattr(roles, name)

    def get(self, name: str) -> RoleClient:
        if name not in self._clients:
            path, role = self._spec(name)
            endpoint = role.endpoint(self.cfg.endpoint)
            engine, http = self._engine(name, path, endpoint)
            self._clients[name] = RoleClient(name, path, role, endpoint, engine, http)
        return self._clients[name]

    def _engine(self, name: str, path: str, e: Endpoint) -> tuple[Any, bool]:
        if e.model_dir is not None:
            key = str(e.model_dir)
            if key not in self._hf:
                from zoomless.engines.hf import HFEngine  # torch only when a local model is used

                if not e.model_dir.is_dir():
                    raise SynthError(f"{path}.model_dir: no such model directory: {e.model_dir}")
                self._hf[key] = HFEngine.from_dir(
                    e.model_dir, batch_size=e.batch_size, name=name, device=e.device, max_pixels=e.max_image_pixels
                )
            return self._hf[key], False
        if not e.base_url:
            raise SynthError(f"{path}: no model: set base_url and model (here or in `endpoint`), or model_dir")
        if not e.model:
            raise SynthError(f"{path}: base_url {e.base_url} is set but not the served model name ('model')")
        key = None
        if e.api_key_env:
            key = os.environ.get(e.api_key_env)
            if not key:
                raise SynthError(f"{path}.api_key_env: the environment variable {e.api_key_env} is not set")
        from zoomless.engines.openai_engine import OpenAIEngine

        engine = OpenAIEngine(
            e.base_url, e.model, key, max_concurrency=e.max_concurrency, timeout_s=e.timeout_s,
            max_retries=e.max_retries, backoff_base_s=e.backoff_base_s, backoff_max_s=e.backoff_max_s,
            max_image_pixels=e.max_image_pixels, image_format=e.image_format, name=name,
        )
        return engine, True

    def clients(self) -> list[RoleClient]:
        return list(self._clients.values())

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._hf.clear()
