"""Backend selection: gf.use_backend, the backend= argument, gf.backends(), 'auto', and running
without the compiled extension (GRADICON_FAST_DISABLE_EXTENSION=1, in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import gradicon_fast as gf
import gradicon_fast.reference

from conftest import HAS_CPU_KERNELS, HAS_CUDA, requires_cpu_kernels

OPS = ("transform_points", "warp", "gradicon_loss", "icon_loss")


@pytest.fixture
def spy(monkeypatch):
    """Records which implementation ran: ("torch", op) for the reference, ("cpu", op) for the fused ops."""
    calls = []
    depth = [0]  # the reference's warp and penalties call its transform_points: record the outer call only

    def wrap(module, name, tag):
        original = getattr(module, name)

        def recorder(*args, **kwargs):
            if depth[0] == 0:
                calls.append((tag, name))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(module, name, recorder)

    for name in OPS:
        wrap(gradicon_fast.reference, name, "torch")
    if HAS_CPU_KERNELS:
        from gradicon_fast import ops

        for name in OPS:
            wrap(ops, name, "cpu")
    return calls


def inputs(rng):
    d, shape = 2, (5, 6)
    ab = [0.05 * torch.rand(2, d, 4, 5, generator=rng), 0.05 * torch.rand(1, d, 6, 3, generator=rng)]
    ba = [0.05 * torch.rand(2, d, 5, 5, generator=rng)]
    points = torch.rand(2, d, 7, generator=rng)
    image = torch.rand(2, 1, *shape, generator=rng)
    noise = torch.randn(1, d, *shape, generator=rng)
    return ab, ba, points, image, noise, shape


def call_all(rng, **backend):
    """Calls every op once (compose goes through transform_points); returns the results."""
    ab, ba, points, image, noise, shape = inputs(rng)
    return [
        gf.transform_points(ab, points, **backend),
        gf.compose(ab, shape, **backend),
        gf.warp(image, ab, **backend),
        gf.gradicon_loss(ab, ba, shape=shape, noise=noise, **backend),
        gf.icon_loss(ab, ba, shape=shape, noise=noise, **backend),
    ]


EXPECTED_OPS = ["transform_points", "transform_points", "warp", "gradicon_loss", "icon_loss"]


def test_backends_keys():
    available = gf.backends()
    assert set(available) == {"torch", "cpu", "cuda", "triton"}
    assert all(isinstance(v, bool) for v in available.values())
    assert available["torch"] is True
    assert available["cpu"] == HAS_CPU_KERNELS
    if not torch.cuda.is_available():
        assert available["cuda"] is False


def test_default_is_auto():
    assert gf.current_backend() == "auto"


@requires_cpu_kernels
def test_auto_picks_cpu_when_built(rng, spy):
    call_all(rng)
    assert spy == [("cpu", op) for op in EXPECTED_OPS]
    spy.clear()
    with gf.use_backend("auto"):
        call_all(rng)
    assert spy == [("cpu", op) for op in EXPECTED_OPS]


def test_use_backend_applies_to_all_ops(rng, spy):
    with gf.use_backend("torch"):
        assert gf.current_backend() == "torch"
        call_all(rng)
    assert spy == [("torch", op) for op in EXPECTED_OPS]
    if HAS_CPU_KERNELS:
        spy.clear()
        with gf.use_backend("cpu"):
            call_all(rng)
        assert spy == [("cpu", op) for op in EXPECTED_OPS]
    if not HAS_CUDA:
        with gf.use_backend("cuda"):  # proves the block reaches every op: each one refuses
            ab, ba, points, image, noise, shape = inputs(rng)
            for call in (lambda: gf.transform_points(ab, points), lambda: gf.compose(ab, shape),
                         lambda: gf.warp(image, ab), lambda: gf.gradicon_loss(ab, ba, shape=shape, noise=noise),
                         lambda: gf.icon_loss(ab, ba, shape=shape, noise=noise)):
                with pytest.raises(RuntimeError, match="cuda"):
                    call()


def test_use_backend_nests_and_restores(rng, spy):
    assert gf.current_backend() == "auto"
    with gf.use_backend("torch"):
        with gf.use_backend("auto"):
            assert gf.current_backend() == "auto"
            with gf.use_backend("torch"):
                assert gf.current_backend() == "torch"
            assert gf.current_backend() == "auto"
        assert gf.current_backend() == "torch"
        call_all(rng)
        assert {tag for tag, _ in spy} == {"torch"}
    assert gf.current_backend() == "auto"
    # restored after an exception too
    with pytest.raises(KeyError):
        with gf.use_backend("torch"):
            raise KeyError("boom")
    assert gf.current_backend() == "auto"


def test_use_backend_is_per_thread():
    seen = {}
    with gf.use_backend("torch"):
        thread = threading.Thread(target=lambda: seen.setdefault("backend", gf.current_backend()))
        thread.start()
        thread.join()
        assert gf.current_backend() == "torch"
    assert seen["backend"] == "auto"


@requires_cpu_kernels
def test_backend_argument_overrides_context(rng, spy):
    with gf.use_backend("torch"):
        call_all(rng, backend="cpu")
    assert spy == [("cpu", op) for op in EXPECTED_OPS]
    spy.clear()
    with gf.use_backend("cpu"):
        call_all(rng, backend="torch")
    assert spy == [("torch", op) for op in EXPECTED_OPS]


@requires_cpu_kernels
def test_backends_agree_through_the_api(rng):
    """The same calls through "torch" and "cpu" (a smoke test of the dispatch; test_cpu_parity is thorough)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    a = call_all(torch.Generator().manual_seed(seed), backend="torch")
    b = call_all(torch.Generator().manual_seed(seed), backend="cpu")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)


DISABLED_SCRIPT = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import gradicon_fast as gf
        from gradicon_fast import reference as R
        result = {"backends": gf.backends()}
        g = torch.Generator().manual_seed(0)
        ab = [0.05 * torch.rand(2, 2, 4, 5, generator=g)]
        ba = [0.05 * torch.rand(2, 2, 5, 4, generator=g)]
        noise = torch.randn(1, 2, 5, 6, generator=g)
        sparse = noise[:, :, ::2, ::2]
        points = torch.rand(2, 2, 9, generator=g)
        image = torch.rand(2, 1, 5, 6, generator=g)
        checks = {
            "gradicon": (gf.gradicon_loss(ab, ba, shape=(5, 6), noise=noise),
                         R.gradicon_loss(ab, ba, shape=(5, 6), noise=noise)),
            "gradicon_sparse": (gf.gradicon_loss(ab, ba, shape=(5, 6), stride=2, noise=sparse),
                                R.gradicon_loss(ab, ba, shape=(5, 6), stride=2, noise=sparse)),
            "icon": (gf.icon_loss(ab, ba, shape=(5, 6), noise=noise), R.icon_loss(ab, ba, shape=(5, 6), noise=noise)),
            "transform_points": (gf.transform_points(ab, points), R.transform_points(ab, points)),
            "warp": (gf.warp(image, ab), R.warp(image, ab)),
        }
        result["equal"] = {k: bool(torch.equal(a, b)) for k, (a, b) in checks.items()}
        unseeded = gf.gradicon_loss(ab, ba, shape=(5, 6), generator=g)
        result["unseeded_finite"] = bool(torch.isfinite(unseeded))
        leaf = ab[0].clone().requires_grad_(True)
        gf.icon_loss([leaf], ba, shape=(5, 6), noise=noise).backward()
        result["grad_finite"] = bool(torch.isfinite(leaf.grad).all())
        try:
            gf.transform_points(ab, points, backend="cpu")
            result["explicit_cpu"] = "no error"
        except RuntimeError as e:
            result["explicit_cpu"] = str(e)
    result["warnings"] = [(w.category.__name__, str(w.message)) for w in caught
                          if "gradicon_fast" in str(w.message)]
    print(json.dumps(result))
""")


def test_without_extension():
    env = dict(os.environ, GRADICON_FAST_DISABLE_EXTENSION="1")
    done = subprocess.run([sys.executable, "-c", DISABLED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backends"]["cpu"] is False and result["backends"]["torch"] is True
    assert all(result["equal"].values()), result["equal"]
    assert result["unseeded_finite"] and result["grad_finite"]
    assert "cpu" in result["explicit_cpu"] and "not available" in result["explicit_cpu"]
    runtime = [w for w in result["warnings"] if w[0] == "RuntimeWarning"]
    assert len(runtime) == 1, result["warnings"]
    assert "reference" in runtime[0][1]
