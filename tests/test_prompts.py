"""The global prompt of both stages is built as the authors build it (docs/fidelity.md)."""

from __future__ import annotations

import pytest

from threedis.engine.layout import Instance, Layout, global_prompt_for

# Odd spacing on purpose: the authors append "," + instance raw, adding and stripping nothing.
GLOBAL = "a park at dusk "
INSTANCES = (" a red bird", "a dog")
EXPECTED = "a park at dusk , a red bird,a dog"  # written by hand, not built by the code under test


def test_global_prompt_is_the_authors_concatenation():
    assert global_prompt_for(GLOBAL, INSTANCES) == EXPECTED
    assert global_prompt_for(GLOBAL, INSTANCES, append_instances=False) == GLOBAL
    assert global_prompt_for(GLOBAL, ()) == GLOBAL


def test_stage2_prompt_list_keeps_every_prompt_as_written():
    layout = Layout(GLOBAL, 64, 64, (Instance(INSTANCES[0], (0.0, 0.0, 0.5, 0.5)),
                                     Instance(INSTANCES[1], (0.5, 0.5, 1.0, 1.0))))
    assert layout.prompts() == [EXPECTED, " a red bird", "a dog"]
    assert layout.prompts(append_instances=False) == [GLOBAL, " a red bird", "a dog"]


@pytest.fixture(scope="module")
def stage1_pipe():
    from threedis.engine.stage1 import Stage1Pipeline
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path

    return Stage1Pipeline.from_pretrained(tiny_ldm3d_path(), device="cpu", local_files_only=True)


def test_stage1_encodes_the_same_global_prompt(stage1_pipe, monkeypatch):
    seen: list[list[str]] = []
    original = stage1_pipe.encode
    monkeypatch.setattr(stage1_pipe, "encode", lambda prompts: (seen.append(list(prompts)), original(prompts))[1])
    result = stage1_pipe.generate(GLOBAL, list(INSTANCES), [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)],
                                  width=64, height=64, steps=1, migc_steps=1, phase_augment=False)
    assert seen[0][0] == EXPECTED and result.settings["prompt"] == EXPECTED
