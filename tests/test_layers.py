"""The layers (docs/architecture.md): app -> services -> protocol -> kvpilot_kernels. The services never import the
app nor each other; the decoder learns what a policy needs from Describe, so a policy that exists only on
the policy service works end to end."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import grpc
import pytest

from decoder_service.remote_policy import RemotePolicy
from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import decoder_pb2 as pb
from policy_service.registry import POLICIES
from policy_service.scorers.base import TopKScorer
from policy_service.server import BackgroundPolicyServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "decoder_service": {"kvpilot", "policy_service"},
    "policy_service": {"kvpilot", "decoder_service"},
    "kvpilot_protocol": {"kvpilot", "decoder_service", "policy_service"},
    "kvpilot_kernels": {"kvpilot", "kvpilot_protocol", "decoder_service", "policy_service"},
}


def imported_packages(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_do_not_import_upwards_or_sideways(package):
    offenders = [f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & FORBIDDEN[package])}"
                 for path in sorted((ROOT / package).rglob("*.py")) if imported_packages(path) & FORBIDDEN[package]]
    assert not offenders, offenders


LAYERS = sorted({*FORBIDDEN, "kvpilot"})


def test_installed_packages_resolve_to_this_repository_from_any_directory(tmp_path):
    """The `kvpilot` command runs with its bin/ folder, not the repository, first on sys.path, so a top-level
    name that a dependency also installs would shadow ours there (transformers >= 4.5x pulls a PyPI package
    called `kernels`: the reason ours is `kvpilot_kernels`). Import every layer from an unrelated folder."""
    code = ("import importlib, pathlib\n"
            f"for name in {LAYERS!r}:\n"
            "    module = importlib.import_module(name)\n"
            "    print(name, pathlib.Path(module.__file__).resolve().parent.parent)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    roots = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert roots == {name: str(ROOT) for name in LAYERS}, (
        f"a top-level package resolves outside this repository (shadowed by an installed distribution, or the "
        f"editable install is stale: re-run `make install`): {roots}")


@dataclass
class KeepOldest(TopKScorer):
    """Keep the oldest slots (a policy only the policy service in this test knows)."""

    name: ClassVar[str] = "keep_oldest"
    stats: ClassVar[frozenset[str]] = frozenset({"key_norm", "positions"})  # declared: the decoder computes them

    def score(self, frame):
        assert "key_norm" in frame.stats, "the decoder did not compute what Describe declared"
        return -frame.stats["positions"].float()


def test_a_policy_only_the_policy_service_knows_works_end_to_end(make_engine):
    assert "keep_oldest" not in POLICIES
    with BackgroundPolicyServer(policies=POLICIES | {"keep_oldest": KeepOldest}) as policy:
        remote = RemotePolicy(policy.address)
        try:
            assert remote.wait_until_available(10)
            engine = make_engine(prefill_chunk=64)
            engine.compressor.policy = remote
            description = remote.describe("keep_oldest", {})
            assert description.spec.names == {"key_norm", "positions"}
            with BackgroundServer(engine) as decoder:
                stub = connect(decoder.address)
                assert "keep_oldest" in stub.GetModelInfo(pb.GetModelInfoRequest()).policies
                responses = list(stub.Generate(build_request(token_ids=list(range(3, 83)), max_new_tokens=30,
                                                             temperature=0.0, policy="keep_oldest", budget=40,
                                                             interval=8, window=8), timeout=60))
                with pytest.raises(grpc.RpcError) as exc:  # the service's answer, relayed
                    list(stub.Generate(build_request(token_ids=[5], max_new_tokens=2, policy="nope", budget=40)))
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown policy 'nope'" in exc.value.details()
            done = responses[-1].complete
            assert done.usage.compression_events > 0 and done.usage.fallbacks == 0
        finally:
            remote.close()
