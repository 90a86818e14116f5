"""train.method: closed_form: the solve, its export as a LoRA, and the file in diffusers."""

import pytest
import torch
from diffusers import DiffusionPipeline

from leco import train
from leco.closed_form import aligned_states, edit_prompts, last_word, text_states
from leco.config import ConfigError, LecoConfig
from leco.errors import LecoError
from leco.models import load_models
from leco.network import read_lora_file

ERASED, GUIDE, KEPT = "a red fox", "a fox", ["a blue car", "a green house"]


def config(folder, out, **closed_form) -> LecoConfig:
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(folder)},
            "prompts": [
                {"target": ERASED, "neutral": GUIDE, "action": "erase"},
                {"target": KEPT, "action": "preserve"},
            ],
            "train": {"method": "closed_form"},
            "network": {"rank": 32},  # the tiny text width: the rank-32 export is the exact edit
            "closed_form": {"regularization": 1e-4, **closed_form},
            "save": {"path": str(out), "name": "cf", "precision": "fp32"},
        }
    )


def outputs(network, models, texts, layer="to_v"):
    """Every attn2 key/value projection's output for the given texts' states, LoRA on and off."""
    states = text_states(models, None, texts)
    layers = [m for name, m in network.layers.items() if name.endswith(f"attn2.{layer}")]
    results = {}
    for strength in (0.0, 1.0):
        with network.strength(strength), torch.no_grad():
            results[strength] = {t: [m(states[t].float()) for m in layers] for t in texts}
    return results, states


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_the_erased_prompt_reads_like_its_guide_and_kept_prompts_do_not_move(tmp_path, tiny_folders, name):
    result = train(config(tiny_folders[name], tmp_path, preserve_scale=10.0), progress=False)
    assert result.state is None and result.steps == 0
    models, network = load_models(str(tiny_folders[name])), result.trainable
    models.unet = network.unet
    results, states = outputs(network, models, [ERASED, GUIDE, *KEPT])
    before, after = results[0.0], results[1.0]
    start, guide_start = last_word(models, ERASED), last_word(models, GUIDE)
    length = states[ERASED].shape[0] - max(start, guide_start)
    for erased, guide in zip(after[ERASED], before[GUIDE], strict=True):
        moved = (erased[start : start + length] - guide[guide_start : guide_start + length]).abs().mean()
        assert moved < 0.1 * guide.abs().mean()  # the erased prompt's values are now its guide's
    for text in KEPT:
        for edited, original in zip(after[text], before[text], strict=True):
            torch.testing.assert_close(edited, original, rtol=0.05, atol=0.05 * original.abs().mean().item())


def test_the_file_is_a_kohya_lora_diffusers_applies_the_same_way(tmp_path, tiny_folders):
    result = train(config(tiny_folders["sd1"], tmp_path), progress=False)
    tensors, metadata = read_lora_file(result.path)
    assert metadata["leco.method"] == "closed_form" and metadata["ss_network_dim"] == "32"
    assert tensors and all(k.split(".")[0].endswith(("_attn2_to_k", "_attn2_to_v")) for k in tensors)
    pipe = DiffusionPipeline.from_pretrained(tiny_folders["sd1"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, _ = pipe.encode_prompt(ERASED, "cpu", 1, False)
    with torch.no_grad():
        before = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(str(result.path))
        theirs = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
        ours = result.trainable.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert (theirs - before).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_erase_and_guide_states_are_aligned_from_the_last_word(tiny_folders):
    models = load_models(str(tiny_folders["sd1"]))
    states = text_states(models, None, ["a big red fox", "a fox"])
    erase, guide = aligned_states(models, states, ["a big red fox"], ["a fox"])
    assert last_word(models, "a big red fox") == 4 and last_word(models, "a fox") == 2
    assert erase.shape == guide.shape == (states["a fox"].shape[0] - 4, states["a fox"].shape[1])
    torch.testing.assert_close(erase[0], states["a big red fox"][4])  # "fox" of the erased prompt
    torch.testing.assert_close(guide[0], states["a fox"][2])


def test_actions_without_a_closed_form_are_refused(tmp_path, tiny_folders):
    document = config(tiny_folders["sd1"], tmp_path).model_dump(mode="json")
    document["prompts"][0]["action"] = "enhance"
    with pytest.raises(ConfigError, match="prompts entry 1: action enhance has no closed form"):
        LecoConfig.model_validate(document).check_combination()
    models = load_models(str(tiny_folders["sd1"]))
    erased, guides, kept = edit_prompts(config(tiny_folders["sd1"], tmp_path), models)
    assert (erased, guides, kept) == ([ERASED], [GUIDE], KEPT)


def test_training_keys_a_closed_form_edit_does_not_use_are_warned_of(tmp_path, tiny_folders, capsys):
    train(config(tiny_folders["sd1"], tmp_path / "a"), progress=False)
    assert "warning" not in capsys.readouterr().err
    document = config(tiny_folders["sd1"], tmp_path / "b").model_dump(mode="json", exclude_unset=True)
    document["train"].update(lr=1e-3, iterations=900)
    train(LecoConfig.model_validate(document), progress=False)
    assert "train.iterations, train.lr: not used by train.method: closed_form" in capsys.readouterr().err


def test_an_edit_that_keeps_nothing_is_warned_of_and_one_onto_itself_refused(tmp_path, tiny_folders, capsys):
    models = load_models(str(tiny_folders["sd1"]))
    alone = config(tiny_folders["sd1"], tmp_path)
    alone.prompts = alone.prompts[:1]  # no preserve entry, no anchors: nothing holds the rest in place
    edit_prompts(alone, models)
    assert "closed form: no prompt is kept" in capsys.readouterr().err
    edit_prompts(config(tiny_folders["sd1"], tmp_path, preserve_scale=0.0), models)  # kept, weighed 0
    assert "closed form: no prompt is kept" in capsys.readouterr().err
    edit_prompts(config(tiny_folders["sd1"], tmp_path), models)
    assert "no prompt is kept" not in capsys.readouterr().err
    itself = config(tiny_folders["sd1"], tmp_path)
    itself.prompts[0].neutral = "A red  fox"  # as CLIP reads it, the target itself: an all-zero edit
    with pytest.raises(LecoError, match="'a red fox' is its own neutral, so the closed-form edit"):
        edit_prompts(itself, models)


def test_a_prompt_longer_than_the_encoder_reads_is_cut_warned_of_and_still_edited(
    tmp_path, tiny_folders, capsys
):
    long = "a red fox " * 40  # past the prompt length: the states stop where the tokenizer cuts it
    models = load_models(str(tiny_folders["sd1"]))
    limit = models.tokenizers[0].model_max_length
    assert last_word(models, long) == limit - 2
    settings = config(tiny_folders["sd1"], tmp_path)
    settings.prompts[0].target = long
    result = train(settings, progress=False)
    assert f"is longer than {limit} tokens and is cut there" in capsys.readouterr().err
    tensors, _ = read_lora_file(result.path)
    assert max(float(t.abs().max()) for key, t in tensors.items() if "lora_up" in key) > 0


def test_unconditional_standing_in_for_the_neutral_is_not_called_ignored(tmp_path, tiny_folders, capsys):
    document = config(tiny_folders["sd1"], tmp_path).model_dump(mode="json", exclude_unset=True)
    del document["prompts"][0]["neutral"]
    document["prompts"][0]["unconditional"] = GUIDE  # the neutral defaults to it: the solve reads it
    settings = LecoConfig.model_validate(document)
    settings.check_combination()
    models = load_models(str(tiny_folders["sd1"]))
    assert edit_prompts(settings, models)[1] == [GUIDE]
    train(settings, progress=False)
    assert "ignored" not in capsys.readouterr().err


def test_a_preserved_prompt_that_is_also_erased_is_warned_of(tmp_path, tiny_folders, capsys):
    settings = config(tiny_folders["sd1"], tmp_path)
    settings.prompts[1].target = [*KEPT, "A red  fox"]  # the erased prompt, as CLIP reads it
    edit_prompts(settings, load_models(str(tiny_folders["sd1"])))
    assert "prompts entry 2 (preserve): 'A red  fox' is a prompt that prompts entry 1 edits" in (
        capsys.readouterr().err
    )


def test_a_closed_form_edit_asked_for_several_processes_solves_once_in_one(tmp_path, tiny_folders, capsys):
    from leco.cli import main

    path = tmp_path / "cf.yaml"
    path.write_text(config(tiny_folders["sd1"], tmp_path / "fresh").model_dump_json())
    assert main(["train", str(path), "--num-processes", "2"]) == 0
    out, err = capsys.readouterr()
    assert "--num-processes 2: a closed-form edit is one solve; it runs in this process" in err
    assert "done: closed-form edit" in out and (tmp_path / "fresh" / "cf_last.safetensors").is_file()


def test_every_process_of_a_launched_closed_form_solves_and_only_the_main_one_writes(
    tmp_path, tiny_folders, monkeypatch
):
    main_file = train(config(tiny_folders["sd1"], tmp_path)).path  # the main process's
    written = main_file.stat().st_mtime_ns
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = train(config(tiny_folders["sd1"], tmp_path))  # no "already holds the run" for its file
    assert other.path == main_file and main_file.stat().st_mtime_ns == written
    assert other.trainable is not None
