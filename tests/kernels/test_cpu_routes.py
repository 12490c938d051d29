"""The measured CPU route of the fused linear loss's float32 GEMMs (kernels/sga_kernels/cpu_routes.py): the decision
rule on fake timings, the probe's wiring on a fake clock, the cache file (key, atomic write, recorded result,
corrupt file), the environment override, and that a warmed-up route is never probed again inside a call.

Every test here points the cache at its own file (SGA_CPU_ROUTE_CACHE) and forgets the process's memo."""
import json
import os
import warnings

import pytest
import torch

from sga.kernels import cpu_routes, linear, linear_gemms, linear_smoothed_ga_loss
from sga.kernels.linear_gemms import MM_ROUTE, ONEDNN_ROUTE, GemmRoute


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    path = tmp_path / "routes" / "cpu-routes.json"
    monkeypatch.setenv("SGA_CPU_ROUTE_CACHE", str(path))
    monkeypatch.delenv("SGA_CPU_ROUTE", raising=False)
    monkeypatch.delenv("SGA_ONEDNN_GEMM", raising=False)
    monkeypatch.setattr(cpu_routes, "_warned_paths", set())
    cpu_routes.clear_memo()
    yield path
    cpu_routes.clear_memo()


def timings(logits, hidden_grad, weight_grad):
    """{gemm: {"mm": 1.0, "onednn": ratio}}: oneDNN's time as a multiple of torch.mm's."""
    return {gemm: {"mm": 1.0, "onednn": ratio}
            for gemm, ratio in zip(linear_gemms.GEMMS, (logits, hidden_grad, weight_grad))}  # fmt: skip


# oneDNN's time / torch.mm's per GEMM (Z, dH, dW) as measured on three CPUs (docs/kernel-notes.md, "v4" and "v6")
@pytest.mark.parametrize("name, ratios, expected", [
    ("AMD EPYC (Zen 5): oneDNN 1.6-2x faster everywhere", (0.45, 0.51, 0.70), ONEDNN_ROUTE),
    ("Intel Xeon with AMX: oneDNN buys nothing", (1.06, 1.02, 1.04), MM_ROUTE),
    ("AMD EPYC (Zen 3): oneDNN wins Z only", (0.88, 1.20, 1.45), GemmRoute("onednn", "mm", "mm")),
    ("within the margin: the simpler route", (0.97, 0.96, 0.999), MM_ROUTE),
    ("just past the margin", (0.94, 1.0, 0.95), GemmRoute("onednn", "mm", "onednn")),
])  # fmt: skip
def test_decision_rule_on_fake_timings(name, ratios, expected):
    assert cpu_routes.decide(timings(*ratios)) == expected, name


def test_decision_without_onednn_timings_is_torch_mm():
    assert cpu_routes.decide({gemm: {"mm": 1.0} for gemm in linear_gemms.GEMMS}) == MM_ROUTE
    assert cpu_routes.decide({}) == MM_ROUTE


class FakeClock:
    """A clock that advances by the fake cost of each GEMM call: the probe's wiring, not the machine's speed."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def __call__(self):
        return self.now

    def calls(self, chunk_rows, hidden_size, vocab, vocab_size):
        def make(gemm):
            def run(route):
                self.now += self.cost[gemm][getattr(route, gemm)]

            return run

        return {gemm: make(gemm) for gemm in linear_gemms.GEMMS}


@pytest.mark.skipif(not linear_gemms.onednn_works(), reason="oneDNN float32 linear unavailable")
@pytest.mark.parametrize("ratios, expected", [
    ((0.5, 0.5, 0.5), ONEDNN_ROUTE),
    ((1.1, 1.0, 0.99), MM_ROUTE),
    ((0.8, 1.3, 1.3), GemmRoute("onednn", "mm", "mm")),
])  # fmt: skip
def test_probe_times_each_gemm_on_each_library_and_decides(monkeypatch, ratios, expected):
    clock = FakeClock(timings(*ratios))
    monkeypatch.setattr(cpu_routes, "probe_clock", lambda threads: clock)
    monkeypatch.setattr(cpu_routes, "_probe_calls", clock.calls)
    record = cpu_routes.probe(torch.float32, 512, 65536, 128)
    assert cpu_routes._route_from_record(record) == expected
    assert record["timings_ms"] == {gemm: {lib: 1e3 * t for lib, t in times.items()}
                                    for gemm, times in timings(*ratios).items()}  # fmt: skip
    assert record["probe_shape"]["rows"] == 128 and record["probe_shape"]["hidden_size"] == 512
    assert record["threads"] == torch.get_num_threads() and record["torch"] == torch.__version__


def test_a_library_far_slower_on_its_first_call_is_not_called_again(monkeypatch):
    """Bounded probe time: oneDNN's dW blocks at 4x torch.mm's time (first call) get no timed rounds; the decision
    uses that first call."""
    clock = FakeClock(timings(0.9, 1.0, 4.0))
    monkeypatch.setattr(cpu_routes, "probe_clock", lambda threads: clock)
    calls = clock.calls
    counted = []

    def counting_calls(*args):
        made = calls(*args)
        return {gemm: (lambda route, gemm=gemm: counted.append((gemm, getattr(route, gemm))) or made[gemm](route))
                for gemm in made}  # fmt: skip

    monkeypatch.setattr(cpu_routes, "_probe_calls", counting_calls)
    record = cpu_routes.probe(torch.float32, 512, 65536, 128)
    assert cpu_routes._route_from_record(record) == GemmRoute("onednn", "mm", "mm")
    assert counted.count(("weight_grad", "onednn")) == 1 and counted.count(("weight_grad", "mm")) == 1
    assert counted.count(("logits", "onednn")) == 1 + cpu_routes.PROBE_ROUNDS
    assert record["timings_ms"]["weight_grad"] == {"mm": 1e3, "onednn": 4e3}


def test_the_probe_on_real_gemms_is_short_and_records_both_libraries(monkeypatch):
    monkeypatch.setattr(cpu_routes, "PROBE_FLOPS", 1 << 22)
    record = cpu_routes.probe(torch.float32, 64, 5000, 128)
    libraries = {"mm", "onednn"} if linear_gemms.onednn_works() else {"mm"}
    assert all(set(times) == libraries and min(times.values()) > 0 for times in record["timings_ms"].values())
    assert record["probe_shape"]["vocab"] == (1 << 22) // (2 * 128 * 64)
    assert record["probe_seconds"] < 5


def test_key_names_cpu_torch_dtype_threads_and_shape():
    key = cpu_routes.route_key(torch.float32, 512, 128256, 128, 1)
    assert key.startswith(cpu_routes.cpu_description() + " | torch " + torch.__version__ + " | float32 | threads 1")
    assert key.endswith(f"D 512 R 128 V 128256 | probe {cpu_routes.PROBE_VERSION}")
    others = [cpu_routes.route_key(torch.float32, 512, 128256, 128, 2), cpu_routes.route_key(torch.float32, 512, 128256, 256, 1),
              cpu_routes.route_key(torch.float32, 256, 128256, 128, 1), cpu_routes.route_key(torch.float64, 512, 128256, 128, 1),
              cpu_routes.route_key(torch.float32, 512, 3000, 128, 1)]  # fmt: skip
    assert len({key, *others}) == 6


def test_cpu_description_names_model_family_and_simd_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                       "model name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\n"
                       "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n")  # fmt: skip
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert cpu_routes.cpu_description() == (
        "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143 stepping 8; amx_bf16 amx_tile avx avx2 avx512_bf16 "
        "avx512f fma)"
    )


ZEN3_LIKE = GemmRoute("onednn", "mm", "mm")


def fake_probe(monkeypatch, route=ZEN3_LIKE):
    """probe() replaced by a recorder returning a record of the given route; returns the list of its calls."""
    calls = []

    def probe(dtype, hidden_size, vocab_size, chunk_rows):
        calls.append((dtype, hidden_size, vocab_size, chunk_rows))
        return {"route": {"logits": route.logits, "hidden_grad": route.hidden_grad, "weight_grad": route.weight_grad,
                          "block_bytes": route.block_bytes}, "timings_ms": {"logits": {"mm": 2.0, "onednn": 1.0}}}  # fmt: skip

    monkeypatch.setattr(cpu_routes, "probe", probe)
    return calls


def test_route_is_probed_once_cached_on_disk_and_read_back(own_cache, monkeypatch):
    calls = fake_probe(monkeypatch)
    route = cpu_routes.route_for(torch.float32, 512, 65536, 128)
    assert route == GemmRoute("onednn", "mm", "mm") and len(calls) == 1
    assert cpu_routes.route_for(torch.float32, 512, 65536, 128) == route and len(calls) == 1  # memo
    content = json.loads(own_cache.read_text())
    key = cpu_routes.route_key(torch.float32, 512, 65536, 128, torch.get_num_threads())
    assert content["format"] == cpu_routes.CACHE_FORMAT and set(content["routes"]) == {key}
    assert content["routes"][key]["timings_ms"] == {"logits": {"mm": 2.0, "onednn": 1.0}}  # the result recorded
    cpu_routes.clear_memo()  # a new process: reads the file, does not probe
    assert cpu_routes.route_for(torch.float32, 512, 65536, 128) == route and len(calls) == 1
    cpu_routes.route_for(torch.float32, 512, 65536, 256)  # another shape class: probed and added
    assert len(calls) == 2 and len(json.loads(own_cache.read_text())["routes"]) == 2


def test_no_probe_where_there_is_no_choice(monkeypatch):
    calls = fake_probe(monkeypatch)
    assert cpu_routes.route_for(torch.bfloat16, 512, 65536, 128) == MM_ROUTE
    assert cpu_routes.route_for(torch.float32, 8, 100, 4) == MM_ROUTE  # below ONEDNN_MIN_FLOPS
    assert calls == []


def test_cache_write_is_atomic_and_keeps_other_records(own_cache, monkeypatch):
    fake_probe(monkeypatch)
    cpu_routes.route_for(torch.float32, 512, 65536, 128)
    before = own_cache.read_text()
    replaced = []
    real_replace = os.replace

    def failing_replace(source, target):
        replaced.append((source, target))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.warns(RuntimeWarning, match="cannot write the CPU route cache"):
        route = cpu_routes.route_for(torch.float32, 256, 65536, 128)
    assert route == GemmRoute("onednn", "mm", "mm")  # still used, for this process
    assert own_cache.read_text() == before  # the old file untouched: the new one went to a temporary first
    assert replaced and replaced[0][1] == own_cache and os.path.dirname(replaced[0][0]) == str(own_cache.parent)
    assert sorted(p.name for p in own_cache.parent.iterdir()) == [own_cache.name]  # the temporary removed
    monkeypatch.setattr(os, "replace", real_replace)
    # a record another process wrote meanwhile is kept when this one writes
    content = json.loads(own_cache.read_text())
    content["routes"]["another process's key"] = content["routes"][next(iter(content["routes"]))]
    own_cache.write_text(json.dumps(content))
    cpu_routes.route_for(torch.float32, 128, 65536, 128)
    assert "another process's key" in json.loads(own_cache.read_text())["routes"]


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 99, "routes": {}}), json.dumps([1, 2]),
                                  json.dumps({"format": 1, "routes": {"k": {"route": {"logits": "cublas"}}}})])  # fmt: skip
def test_corrupt_cache_is_ignored_with_one_warning_and_rewritten(own_cache, monkeypatch, text):
    calls = fake_probe(monkeypatch)
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text(text)
    with pytest.warns(RuntimeWarning, match="CPU route cache .* is corrupt"):
        route = cpu_routes.route_for(torch.float32, 512, 65536, 128)
    assert route == GemmRoute("onednn", "mm", "mm") and len(calls) == 1
    assert json.loads(own_cache.read_text())["format"] == cpu_routes.CACHE_FORMAT  # replaced by a valid file
    own_cache.write_text(text)
    cpu_routes.clear_memo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file and process
        cpu_routes.route_for(torch.float32, 512, 65536, 128)


@pytest.mark.parametrize("value, expected", [
    ("mm", MM_ROUTE),
    ("onednn", ONEDNN_ROUTE),
    ("ONEDNN", ONEDNN_ROUTE),
    ("logits=onednn,weight_grad=onednn", GemmRoute("onednn", "mm", "onednn")),
    (" hidden_grad = onednn ", GemmRoute("mm", "onednn", "mm")),
])  # fmt: skip
def test_environment_forces_a_route_without_probe_or_cache(own_cache, monkeypatch, value, expected):
    calls = fake_probe(monkeypatch)
    monkeypatch.setenv("SGA_CPU_ROUTE", value)
    assert cpu_routes.route_for(torch.float32, 512, 65536, 128) == expected
    assert calls == [] and not own_cache.exists()


def test_old_switch_still_forces_torch_mm(monkeypatch):
    calls = fake_probe(monkeypatch)
    monkeypatch.setenv("SGA_ONEDNN_GEMM", "0")
    assert cpu_routes.route_for(torch.float32, 512, 65536, 128) == MM_ROUTE and calls == []
    monkeypatch.setenv("SGA_CPU_ROUTE", "onednn")  # the new variable wins
    assert cpu_routes.route_for(torch.float32, 512, 65536, 128) == ONEDNN_ROUTE


@pytest.mark.parametrize("value", ["fast", "logits=cublas", "dw=mm", "logits"])
def test_a_bad_forced_route_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("SGA_CPU_ROUTE", value)
    with pytest.raises(ValueError, match="SGA_CPU_ROUTE="):
        cpu_routes.route_for(torch.float32, 512, 65536, 128)


def test_the_loss_uses_the_route_and_a_warmed_up_route_never_probes_inside_a_call(monkeypatch):
    """warm_up_cpu_route settles the exact route a call will use (its chunk rows included), so the call itself
    only looks it up; the GEMMs then run on the route's libraries."""
    monkeypatch.setattr(linear_gemms, "ONEDNN_MIN_FLOPS", 0)
    calls = fake_probe(monkeypatch, GemmRoute("mm", "onednn", "mm"))
    generator = torch.Generator().manual_seed(60)
    hidden = torch.randn(300, 16, generator=generator, requires_grad=True)
    weight = torch.randn(1000, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 1000, (300,), generator=generator)
    labels[::3] = -100
    route = linear.warm_up_cpu_route(hidden, weight, labels)
    assert route == GemmRoute("mm", "onednn", "mm") and calls == [(torch.float32, 16, 1000, 128)]  # R = 128 rows

    def no_probe(*args):
        raise AssertionError("probed inside a call")

    monkeypatch.setattr(cpu_routes, "probe", no_probe)
    used = []
    real_hidden_grad = linear_gemms.hidden_grad
    monkeypatch.setattr(linear_gemms, "hidden_grad", lambda g, w, r: used.append(r) or real_hidden_grad(g, w, r))
    loss = linear_smoothed_ga_loss(hidden, weight, labels, smoothing=0.1)
    loss.backward()
    assert used and all(r == route for r in used)
    monkeypatch.setenv("SGA_CPU_ROUTE", "mm")
    expected = linear_smoothed_ga_loss(hidden.detach(), weight.detach(), labels, smoothing=0.1, chunk_size=1000)
    torch.testing.assert_close(loss.detach(), expected)


def test_cache_path_defaults_to_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("SGA_CPU_ROUTE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_routes.cache_path() == tmp_path / "sga" / "cpu-routes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_routes.cache_path() == tmp_path / "home" / ".cache" / "sga" / "cpu-routes.json"
