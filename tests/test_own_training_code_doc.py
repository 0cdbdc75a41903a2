"""docs/own_training_code.md runs as written: its Python blocks, in order, and its list of converters is complete."""

import re
from pathlib import Path

import torch

from gradicon_fast import convert

PAGE = Path(__file__).resolve().parent.parent / "docs" / "own_training_code.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_page_examples_run_and_train(capsys):
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    torch.manual_seed(0)
    namespace: dict = {"__name__": "own_training_code"}
    exec(compile(blocks[0], f"{PAGE}:example", "exec"), namespace)
    # the example took one optimiser step on a loss with both terms, and the gradients reached the network
    net, loss = namespace["net"], namespace["loss"]
    assert torch.isfinite(loss) and namespace["penalty"] >= 0
    assert all(p.grad is not None for p in net.parameters())
    assert net.flow.weight.grad.abs().sum() > 0
    assert "GradICON" in capsys.readouterr().out
    for i, block in enumerate(blocks[1:], start=1):
        exec(compile(block, f"{PAGE}:block{i}", "exec"), namespace)


def test_the_page_names_every_converter():
    text = PAGE.read_text(encoding="utf-8")
    for name in convert.__all__:
        assert f"`{name}(" in text, name
