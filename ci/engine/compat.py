"""Capability probes: does the installed engine accept this keyword or CLI flag?

Engines move fast and runners lag: a kwarg or flag kiln passes may not exist
in the version a runner has installed. The rule (sglang #24222): when a
feature is missing, run without it and warn -- unless the user explicitly
asked for that feature (e.g. metrics), in which case fail loudly, naming the
version that has it when kiln knows one.

Keywords are probed with ``inspect.signature``. CLI flags are probed by
running the engine's ``--help`` once per engine version and parsing it; the
result is cached in a JSON file keyed by "<engine> <version>" (an engine's
``--help`` imports torch and takes seconds to tens of seconds). The cache also
remembers every version seen on the runner, which is how a failure can say
"vllm 0.32.0 (seen on this runner) has it".
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import filelock
from packaging.version import InvalidVersion, Version

from ci.host import cachedir, procs

log = logging.getLogger(__name__)

# An engine's --help imports the whole stack (torch, triton); on a cold 2-core
# runner that is well under a minute. A hang here must not eat the job.
HELP_TIMEOUT_S = 120.0
# The cache file is tiny; a lock held longer than this is a crashed writer.
CACHE_LOCK_TIMEOUT_S = 30.0
CACHE_FORMAT = 1
# Fewer long options than this is not a help text (a crash message, a wrapper
# script's usage line); caching it would wrongly report every flag missing.
MIN_HELP_FLAGS = 3
# A long option as argparse prints it: --name, --name-with-dashes, --a.b (vLLM's
# dotted config options), not followed by more word characters.
_FLAG_RE = re.compile(r"(?<![\w-])(--[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?)")


class FeatureUnavailable(RuntimeError):
    """An explicitly requested feature is missing from the installed engine."""


def accepts_keyword(func: Callable[..., Any], keyword: str) -> bool:
    """Whether ``func`` names ``keyword`` as a parameter that can be passed by keyword.

    A bare ``**kwargs`` does not count: catch-alls usually forward to code
    that rejects (or silently drops) the unknown keyword, which is the very
    failure the probe exists to prevent.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: cannot prove it
        return False
    param = sig.parameters.get(keyword)
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                inspect.Parameter.KEYWORD_ONLY)


def parse_help_flags(text: str) -> frozenset[str]:
    """Every long option (``--x``) mentioned in an argparse-style ``--help`` text."""
    return frozenset(m.group(1).rstrip(".") for m in _FLAG_RE.finditer(text))


def default_cache_path() -> Path:
    """``$KILN_CACHE_DIR/compat/help-flags.json``, else under ``<repo>/.kiln/cache``."""
    return cachedir.default_root() / "compat" / "help-flags.json"


def _version_key(v: str) -> tuple:
    try:
        return (0, Version(v))
    except InvalidVersion:
        return (1, v)


class HelpCache:
    """The flags of each (engine, version)'s ``--help``, in one JSON file.

    Keyed by version so an upgrade re-probes; written atomically under a file
    lock so two jobs on one host never see a torn file.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_cache_path()

    @staticmethod
    def key(engine: str, version: str) -> str:
        """The cache key of one engine version."""
        return f"{engine} {version}"

    def _read(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A corrupt cache costs one re-probe, never a failed run.
            log.warning("ignoring unreadable help cache %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, engine: str, version: str) -> frozenset[str] | None:
        """The cached flags of ``engine`` ``version``, or None when never probed."""
        flags = self._read().get(self.key(engine, version))
        return frozenset(flags) if isinstance(flags, list) else None

    def put(self, engine: str, version: str, flags: Iterable[str]) -> None:
        """Record the flags of ``engine`` ``version``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock", timeout=CACHE_LOCK_TIMEOUT_S):
            entries = self._read()
            entries[self.key(engine, version)] = sorted(flags)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".help-flags.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump({"format": CACHE_FORMAT, "entries": entries}, fh, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def versions_with(self, engine: str, flag: str) -> list[str]:
        """Versions of ``engine`` seen on this host whose ``--help`` lists ``flag``, oldest first."""
        prefix = engine + " "
        found = [k[len(prefix):] for k, flags in self._read().items()
                 if k.startswith(prefix) and isinstance(flags, list) and flag in flags]
        return sorted(found, key=_version_key)


class FlagProbe:
    """The CLI flags one installed engine version accepts, from its ``--help``.

    ``help_argv`` is run at most once per probe; with a known ``version`` the
    result is cached in ``cache`` and later probes of that version never run it.
    """

    def __init__(self, engine: str, version: str | None, help_argv: Sequence[str], *,
                 cache: HelpCache | None = None, timeout_s: float = HELP_TIMEOUT_S,
                 env: Mapping[str, str] | None = None):
        self.engine = engine
        self.version = version
        self.help_argv = list(help_argv)
        self.cache = cache
        self.timeout_s = timeout_s
        self.env = dict(env) if env is not None else None
        self._flags: frozenset[str] | None = None

    @classmethod
    def for_backend(cls, backend: Any, *, cache: HelpCache | None = None,
                    env: Mapping[str, str] | None = None) -> "FlagProbe":
        """A probe running ``backend``'s launch command with ``--help`` (argparse exits early)."""
        argv = backend.command("kiln-help-probe", 1, args=["--help"])
        return cls(backend.name, backend.version(), argv, cache=cache, env=env)

    def flags(self) -> frozenset[str]:
        """The accepted flags (probing or reading the cache on first use)."""
        if self._flags is None:
            cached = (self.cache.get(self.engine, self.version)
                      if self.cache is not None and self.version else None)
            if cached is not None:
                self._flags = cached
            else:
                self._flags = self._run_help()
                if self.cache is not None and self.version:
                    self.cache.put(self.engine, self.version, self._flags)
        return self._flags

    def has(self, flag: str) -> bool:
        """Whether the engine's ``--help`` lists ``flag``."""
        return flag in self.flags()

    def _run_help(self) -> frozenset[str]:
        env = {**os.environ, **self.env} if self.env is not None else None
        log.info("probing %s %s flags: %s", self.engine, self.version or "?", " ".join(self.help_argv))
        try:
            # Supervised like a server: importing an engine may start helper
            # processes, and a timeout must not leave them behind.
            code, output = procs.run_contained(self.help_argv, timeout_s=self.timeout_s, env=env)
        except TimeoutError:
            raise RuntimeError(f"{self.engine} --help did not finish in {self.timeout_s:g} s") from None
        except RuntimeError as exc:
            raise RuntimeError(f"cannot run {self.engine} --help: {exc}") from None
        flags = parse_help_flags(output)
        if code != 0 or len(flags) < MIN_HELP_FLAGS:
            tail = output.strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{self.engine} --help exited {code} without a usable "
                               f"help text: {tail[0][:200]}")
        return flags

    def where_available(self, flag: str) -> str | None:
        """Versions of this engine seen on this host that have ``flag``, for messages."""
        if self.cache is None:
            return None
        versions = [v for v in self.cache.versions_with(self.engine, flag) if v != self.version]
        return ", ".join(versions) or None


def degrade_or_fail(feature: str, available: bool, *, requested: bool, engine: str,
                    version: str | None, since: str | None = None) -> bool:
    """Decide one feature: True to use it; False to run without it (after a warning).

    Raises FeatureUnavailable when it is missing but was explicitly requested.
    ``since`` names a version known to have it (from the caller or the help cache).
    """
    if available:
        return True
    installed = f"{engine} {version}" if version else f"{engine} (version unknown)"
    if requested:
        where = f"{engine} {since} has it" if since else "kiln knows no version that has it"
        raise FeatureUnavailable(f"{feature} was requested but {installed} does not support it; "
                                 f"{where}")
    log.warning("%s does not support %s; running without it", installed, feature)
    return False


def filter_kwargs(func: Callable[..., Any], kwargs: Mapping[str, Any], *, engine: str,
                  version: str | None, requested: Iterable[str] = (),
                  since: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``kwargs`` without the keywords ``func`` does not accept (each warned about).

    A dropped keyword listed in ``requested`` raises FeatureUnavailable instead.
    """
    requested, since = set(requested), dict(since or {})
    return {k: v for k, v in kwargs.items()
            if degrade_or_fail(f"keyword {k!r}", accepts_keyword(func, k),
                               requested=k in requested, engine=engine, version=version,
                               since=since.get(k))}


def split_flags(args: Sequence[str]) -> list[list[str]]:
    """Group launch args into [flag, values...] runs; ``--x=v`` stays one token.

    A value is any following token that does not start with ``--`` (so negative
    numbers like ``-1`` stay values). Tokens before the first flag form their own group.
    """
    groups: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def filter_flags(probe: FlagProbe, args: Sequence[str], *, requested: Iterable[str] = (),
                 since: Mapping[str, str] | None = None) -> list[str]:
    """``args`` without the flags (and their values) the engine does not accept.

    A dropped flag listed in ``requested`` raises FeatureUnavailable naming a
    version that has it: from ``since``, else from versions seen on this host.
    """
    requested, since = set(requested), dict(since or {})
    kept: list[str] = []
    for group in split_flags(args):
        flag = group[0].split("=", 1)[0]
        if not flag.startswith("--"):
            kept += group
            continue
        known = since.get(flag)
        if not probe.has(flag):
            known = known or probe.where_available(flag)
        if degrade_or_fail(f"flag {flag}", probe.has(flag), requested=flag in requested,
                           engine=probe.engine, version=probe.version, since=known):
            kept += group
    return kept
