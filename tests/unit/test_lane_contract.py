"""Every lane a user deploys runs as configured (issue 20): each routed matrix entry's plan is startable.

The cases are the workflows' own matrices (ci/profiles/routing.py): pull_request,
schedule and a workflow_dispatch of each pool, every entry of each. A new
runner row or pool is a new case with no edit here. For each entry, the plan
is what ``invoke ci --profile P --dry-run`` makes, through the same Python
(ci.images.device_plan, ci.chain, ci.engine.launch), checked against a full
runner of its kind:

- devices: the container gets exactly the planned GPUs -- NVIDIA a device
  request for them, AMD ``/dev/kfd`` and their render nodes, found in a fake
  MI300X KFD topology (tests/fakes/kfd.py; no AMD GPU is reachable from CI);
- launch: every server the lane's e2e tests launch by default (tp=1, and tp=2
  where test_multi_gpu.py asks for it) carries the args and env its kits need;
- model: the lane's default model is one the runner can obtain, and the
  kits have bounds for it.

Every AMD job once died at its start step because the plan handed the
container no device; this is the test that would have said so. ``-s`` prints
every entry and its plan.
"""
from __future__ import annotations

import io
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import pytest

from ci import chain
from ci.engine import launch, models
from ci.engine.backends import BackendSpec, get_backend
from ci.images import containers, device_plan, imageref
from ci.kits import thresholds
from ci.profiles import routing, runners
from tests.fakes import kfd

ROOT = Path(__file__).resolve().parents[2]
# Any valid port: the pool reserves the real one at launch; only the argv's shape is checked.
PLACEHOLDER_PORT = 30000
RUN_TAG = "lane-contract"
START_RE = re.compile(r"^\[kiln ci\] step \d+ start: (.*)$", re.M)
# tests/e2e/test_multi_gpu.py asks for the default model at tp=2 on lanes with two GPUs or more;
# every other default-model test launches it at tp=1. Kit needs come from the profile and the
# backend (a test's own args only add to them), so these two launches carry the lane's contract.
MULTI_GPU_TP = 2
# What an engine's kits need beyond what its spec says (metrics_flag, step_timer), with why.
ENGINE_KIT_NEEDS: Mapping[str, tuple[tuple[str, str, str], ...]] = MappingProxyType({
    "sglang": (
        ("arg", "--enable-metrics",
         "the metrics and occupancy kits scrape /metrics, which SGLang serves only with it (sglang #25886)"),
        ("env", "SGLANG_ENABLE_METRICS_DEVICE_TIMER=1",
         "SGLang times forward passes on the device only with it (sglang/srt/utils/device_timer.py); "
         "the occupancy kit reads the gauges built from those timings"),
    ),
})
# Hub settings the chain must carry into the container for a hub model to be fetched
# (or found offline in the mounted HF cache).
HUB_PASSTHROUGH = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE")


# ------------------------------------------------------------------ the routed matrices

def runs() -> list[tuple[str, str | None]]:
    """Every way a workflow run is routed: each event, and a manual dispatch of each pool."""
    return [(event, None) for event in routing.ROUTES] + [(routing.DISPATCH_EVENT, pool)
                                                           for pool in routing.known_pools()]


def routed_entries() -> list[tuple[str, str, dict]]:
    """(event, pool, matrix entry) for every entry of every routed matrix, as the workflows get them."""
    out = []
    for event, pool_input in runs():
        values = routing.outputs(event, pool_input)
        out += [(event, values["pool"], entry) for entry in json.loads(values["matrix"])["include"]]
    return out


ENTRIES = routed_entries()


def _params() -> list:
    return [pytest.param(event, pool, entry, id=f"{event}-{pool}-{entry['profile']}")
            for event, pool, entry in ENTRIES]


# ------------------------------------------------------------------ one entry's plan

@dataclass
class LanePlan:
    """What `invoke ci --profile P --dry-run` plans for one profile, and what it becomes on a full runner."""

    profile: runners.Profile
    backend: BackendSpec
    chain_out: str                       # every line the dry-run chain printed
    start: list[str]                     # the start step's command, word by word
    devices: tuple[str, ...]             # the planned GPU ids
    create: dict                         # containers.create's arguments on a full runner ({} when refused)
    create_error: str                    # why the start would refuse the plan ("" when it would not)
    host: kfd.FakeAmdHost | None         # the full AMD runner (None for NVIDIA)
    launches: dict[int, tuple[list[str], dict[str, str]]] = field(default_factory=dict)  # tp -> (argv, env)


def _launch(profile: runners.Profile, backend: BackendSpec, tp: int, cache_root: Path) -> tuple[list, dict]:
    """The argv and engine env of the default model's server at ``tp``, composed by the pool's launch path."""
    built: dict = {}

    def capture(backend, model, **kwargs):  # launch.build_server's factory: record, start nothing
        built.update(kwargs, backend=backend, model=model)

    launch.build_server(profile, backend, launch.ServerKey(profile.default_model, tp), log_dir=cache_root,
                        cache_root=cache_root, factory=capture)
    argv = backend.command(built["model"], PLACEHOLDER_PORT, tp, built["args"], built["served_name"])
    # As Server._launch merges them: the spec's env, then the launch's (caches, the profile's).
    return argv, {**dict(backend.env), **built["env"]}


def build_plan(profile: runners.Profile, root: Path) -> LanePlan:
    """Plan ``profile`` as the dry-run chain does, on a full runner of its kind under ``root``."""
    host = kfd.make_host(root / "host", gpus=profile.gpus) if profile.vendor == "amd" else None
    sys_root = host.sys_root if host else root / "no-sys"
    dev_root = host.dev_root if host else root / "no-dev"
    devices = device_plan.plan_devices(profile, dry_run=True, env={}, sys_root=sys_root)
    opts = chain.Options(profile=profile, dry_run=True, workspace=ROOT, run_tag=RUN_TAG, devices=devices,
                         sys_root=sys_root, dev_root=dev_root)
    out = io.StringIO()
    assert chain.run(opts, out=out, env={}) == 0, out.getvalue()
    starts = START_RE.findall(out.getvalue())
    assert len(starts) == 1, f"the {profile.name} chain plans no container start:\n{out.getvalue()}"
    spec = containers.ContainerSpec(**chain.container_spec_args(opts, {}))
    try:
        create, create_error = containers.container_kwargs(spec, dev_root=dev_root, sys_root=sys_root), ""
    except containers.ContainerError as exc:  # the devices check reports it; the others still run
        create, create_error = {}, str(exc)
    backend = get_backend(profile.backend)
    tps = sorted({1, MULTI_GPU_TP} if profile.gpus >= MULTI_GPU_TP else {1})
    cache_root = root / "cache"
    return LanePlan(profile, backend, out.getvalue(), shlex.split(starts[0]), devices, create, create_error, host,
                    {tp: _launch(profile, backend, tp, cache_root) for tp in tps})


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """One plan per profile, made on first use (a profile appears in several matrices)."""
    made: dict[str, LanePlan] = {}

    def plan_of(name: str) -> LanePlan:
        if name not in made:
            made[name] = build_plan(runners.get_profile(name), tmp_path_factory.mktemp(name))
        return made[name]
    return plan_of


# ------------------------------------------------------------------ what each lane needs

def kit_needs(plan: LanePlan) -> list[tuple[str, str, str]]:
    """(kind "arg"|"env", value, why) every launch on this lane must carry for its kits."""
    p, b = plan.profile, plan.backend
    needs = []
    if b.metrics_flag:
        needs.append(("arg", b.metrics_flag, f"{b.name} serves the gauges the metrics/occupancy kits read "
                                             f"only with it (BackendSpec.metrics_flag)"))
    if b.step_timer and thresholds.for_profile(p.name).occupancy.step_busy_min is not None:
        needs.append(("arg", b.step_timer.flag, "the step-occupancy kit has a bound on this lane and reads "
                                                "the per-step timer it turns on"))
    needs += [n for n in ENGINE_KIT_NEEDS.get(b.name, ()) if n not in needs]
    # One need, one entry: a spec field and the table may name the same flag.
    return list({(kind, value): (kind, value, why) for kind, value, why in needs}.values())


def missing_needs(plan: LanePlan) -> list[str]:
    """Each need some launch of the lane lacks, as 'tp=N: value (why)'."""
    out = []
    for tp, (argv, env) in plan.launches.items():
        for kind, value, why in kit_needs(plan):
            if kind == "arg":
                ok = value in argv
            else:
                name, _, want = value.partition("=")
                ok = env.get(name) == want
            if not ok:
                out.append(f"tp={tp}: {value} ({why})")
    return out


def model_source(profile: runners.Profile) -> str:
    """Where the runner gets the lane's default model from; AssertionError when it cannot."""
    name = profile.default_model
    models.check(name)
    if name in models.LOCAL_MODELS:
        reason = models.lane_skip_reason(name, profile.vendor)
        assert reason is None, f"{profile.name}'s default model never runs there: {reason}"
        return "kiln local model, built on the runner: ci/engine/models.py"
    assert not Path(name).expanduser().is_absolute(), (
        f"{profile.name}'s default model is a directory ({name}): no planning machine can tell whether "
        "a runner has it; use a kiln local model or a hub id")
    missing = [v for v in HUB_PASSTHROUGH if v not in chain.PASSTHROUGH_ENV]
    assert not missing, f"hub model {name} but the chain does not pass {missing} into the container"
    return ("hub id, fetched at launch from huggingface.co or $HF_ENDPOINT, or read offline from the "
            "runner's HF cache: HF_ENDPOINT/HF_TOKEN/HF_HUB_OFFLINE passed through, ~/.cache/huggingface "
            "mounted when present")


# ------------------------------------------------------------------ the checks

@pytest.mark.parametrize("event, pool, entry", _params())
def test_the_container_gets_exactly_the_planned_gpus(plans, event, pool, entry):
    plan = plans(entry["profile"])
    p, start = plan.profile, plan.start
    assert entry["session"] == p.session and entry["gpus"] == p.gpus and entry["vendor"] == p.vendor
    assert p.image and imageref.parse_ref(p.image), f"{p.name} has no image to start"
    assert start[:3] == ["invoke", "start", p.image] and start[start.index("--vendor") + 1] == p.vendor
    assert [start[i + 1] for i, w in enumerate(start) if w == "--device"] == list(plan.devices)
    assert len(set(plan.devices)) == p.gpus, f"{p.name} needs {p.gpus} GPUs, the plan has {plan.devices}"
    assert not plan.create_error, f"the start would refuse {p.name}'s plan: {plan.create_error}"
    if p.vendor == "nvidia":
        (request,) = plan.create["device_requests"]
        assert request.device_ids == list(plan.devices) and request.count in (None, 0)  # never "all"
    else:
        host = plan.host
        expected = [f"{host.dev_root}/kfd:/dev/kfd:rwm"] + [
            f"{host.render_node(int(i))}:/dev/dri/{host.render_node(int(i)).name}:rwm" for i in plan.devices]
        assert plan.create["devices"] == expected
        assert "device_requests" not in plan.create
        # The chain says, before the start, which nodes the indices became.
        assert " ".join(str(host.render_node(int(i))) for i in plan.devices) in plan.chain_out


@pytest.mark.parametrize("event, pool, entry", _params())
def test_every_launch_carries_what_its_kits_need(plans, event, pool, entry):
    missing = missing_needs(plans(entry["profile"]))
    assert not missing, f"{entry['profile']} launches without: " + "; ".join(missing)


@pytest.mark.parametrize("event, pool, entry", _params())
def test_the_default_model_is_obtainable_and_bounded(plans, event, pool, entry):
    p = plans(entry["profile"]).profile
    model_source(p)
    # The accuracy, perf and occupancy kits need bounds for (profile, model), or they fail naming the pair.
    thresholds.for_profile(p.name, p.default_model)


def test_every_gpu_profile_is_routed_and_prints_each_entry_with_its_plan(plans):
    routed = {entry["profile"] for _, _, entry in ENTRIES}
    gpu_profiles = {n for n, p in runners.PROFILES.items() if p.vendor not in routing.MATRIX_SKIP_VENDORS}
    assert routed == gpu_profiles, f"GPU profiles no workflow run reaches: {sorted(gpu_profiles - routed)}"
    lines = [f"lane contract: {len(ENTRIES)} routed matrix entries "
             f"({', '.join(e if not p else f'{e} pool={p}' for e, p in runs())})"]
    for event, pool, entry in ENTRIES:
        lines.append(f"  {event:<17} {pool:<6} {entry['profile']:<8} {entry['runner']:<17} "
                     f"{entry['vendor']} x{entry['gpus']}")
    lines.append("plans, per profile (what invoke ci --profile P --dry-run plans; devices on a full runner):")
    for name in sorted(routed, key=list(runners.PROFILES).index):
        lines += describe_plan(plans(name))
    print("\n".join(lines))


def image_status(p: runners.Profile) -> str:
    """Whether the lane's image is an engine release kiln ran on a GPU (and where that is written)."""
    verified = runners.VERIFIED.get(p.backend)
    tag = imageref.parse_ref(p.image).tag or ""
    if p.vendor == "nvidia" and verified and tag.startswith(f"v{verified.version}"):
        digest = verified.digest or "digest not recorded (the GPU machines reach no registry)"
        return f"{p.backend} {verified.version} verified ({verified.where}); {digest}"
    return f"NOT VERIFIED by kiln ({p.vendor}: no such GPU has been reachable)"


def describe_plan(plan: LanePlan) -> list[str]:
    """A few lines: the start command, the devices, each launch, what the kits lack, the model."""
    p = plan.profile
    start = plan.start[:plan.start.index("--shm-size")]
    if plan.create_error:
        devices = f"REFUSED: {plan.create_error}"
    elif p.vendor == "amd":
        devices = (" ".join(d.split(":")[1] for d in plan.create["devices"])
                   + f" (the fake MI300X host's nodes; group_add {','.join(plan.create['group_add'])})")
    else:
        devices = f"docker device request (gpu), ids {','.join(plan.create['device_requests'][0].device_ids)}"
    out = [f"  {p.name} ({p.vendor} x{p.gpus}, backend {p.backend})",
           f"    start:   {shlex.join(start)} ... (shm, mounts, env, keep-alive)",
           f"    image:   {image_status(p)}",
           f"    devices: {devices}"]
    for tp, (argv, _) in plan.launches.items():
        out.append(f"    launch tp={tp}: {shlex.join(['python', *argv[1:]])}")
    env = next(iter(plan.launches.values()))[1]
    out.append(f"    env:     {', '.join(sorted(env))}")
    missing = missing_needs(plan)
    needs = ", ".join(v for _, v, _ in kit_needs(plan)) or "nothing beyond the defaults"
    out.append(f"    kits need: {needs}" + (f" -- MISSING: {'; '.join(m.split(' (')[0] for m in missing)}"
                                              if missing else " -- all present"))
    try:
        source = model_source(p).split(":")[0]
    except AssertionError as exc:
        source = f"NOT OBTAINABLE: {exc}"
    out.append(f"    model:   {p.default_model} ({source})")
    return out


@pytest.mark.parametrize("name", sorted(n for n, p in runners.PROFILES.items() if p.vendor == "nvidia"))
def test_every_nvidia_image_is_a_release_kiln_verified_with_its_engine(name):
    # A lane must start the engine release its bounds and kits were checked with: the
    # NVIDIA image once named vLLM v0.11.0 while every GPU run used 0.26.0.
    p = runners.get_profile(name)
    verified = runners.VERIFIED[p.backend]
    tag = imageref.parse_ref(p.image).tag
    assert tag in (f"v{verified.version}", f"v{verified.version}-cu130"), (
        f"{name}: image {p.image} is not the verified {p.backend} {verified.version} ({verified.where})")
