"""Negative embeddings: only the new token's vectors train; the file loads where embeddings load."""

import pytest
import torch
from diffusers import DiffusionPipeline

from leco import train
from leco.config import ConfigError, LecoConfig
from leco.errors import LecoError
from leco.models import load_models
from leco.network import read_lora_file
from leco.trainer import Trainer

TOKEN = "<no-fox>"


def embedding_config(folder, out, *, token=TOKEN, iterations=6, **network) -> LecoConfig:
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(folder)},
            "network": {"type": "embedding", "token": token, "vectors": 2, "init_text": "fox", **network},
            "prompts": [
                {"target": ["a red fox", "a fox in the snow"]},
                {"target": ["a blue car", "a house"], "action": "preserve"},
            ],
            "train": {
                "precision": "fp32",
                "iterations": iterations,
                "seed": 2,
                "max_denoising_steps": 8,
                "lr": 5e-2,
            },
            "save": {"path": str(out), "name": "no_fox", "per_steps": 4},
        }
    )


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_only_the_tokens_vectors_train(tmp_path, tiny_folders, name):
    trainer = Trainer(embedding_config(tiny_folders[name], tmp_path), progress=False)
    models = trainer.models
    frozen = {
        "unet": {k: v.clone() for k, v in models.unet.state_dict().items()},
        **{
            f"te{i}": {k: v.clone() for k, v in e.state_dict().items()}
            for i, e in enumerate(models.text_encoders)
        },
    }
    start = [v.detach().clone() for v in trainer.trainable.parameters()]
    assert [tuple(v.shape) for v in start] == [(2, e.config.hidden_size) for e in models.text_encoders]
    for _ in range(3):
        trainer.train_step()
    assert all(not torch.equal(a, b) for a, b in zip(start, trainer.trainable.parameters(), strict=True))
    assert all(torch.equal(v, models.unet.state_dict()[k]) for k, v in frozen["unet"].items())
    for i, encoder in enumerate(models.text_encoders):
        now = encoder.state_dict()
        for key, before in frozen[f"te{i}"].items():
            assert torch.equal(before, now[key]), key  # the new rows' stand-ins never change either


def test_the_file_loads_in_diffusers_with_the_trained_vectors_sd1(tmp_path, tiny_folders):
    result = train(embedding_config(tiny_folders["sd1"], tmp_path), progress=False)
    tensors, metadata = read_lora_file(result.path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape[0] == 2
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["modelspec.is_negative_embedding"] == "True" and metadata["leco.token"] == TOKEN
    pipe = DiffusionPipeline.from_pretrained(tiny_folders["sd1"])
    pipe.load_textual_inversion(str(result.path), token=TOKEN)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(loaded, tensors["emb_params"].to(loaded.dtype))
    assert pipe.maybe_convert_prompt(TOKEN, pipe.tokenizer) == f"{TOKEN} {TOKEN}_1"


def test_the_file_loads_in_diffusers_with_the_trained_vectors_sdxl(tmp_path, tiny_folders):
    result = train(embedding_config(tiny_folders["sdxl"], tmp_path, iterations=2), progress=False)
    tensors, metadata = read_lora_file(result.path)
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    pipe = DiffusionPipeline.from_pretrained(tiny_folders["sdxl"])
    pipe.load_textual_inversion(
        tensors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tensors["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for key, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], tensors[key])


def test_the_rollout_samples_with_the_token_as_negative_prompt(tmp_path, tiny_folders):
    trainer = Trainer(embedding_config(tiny_folders["sd1"], tmp_path), progress=False)
    seen = []
    handle = trainer.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    trainer.samples.roll_out()
    handle.remove()
    negative, positive = seen[0].chunk(2)
    with torch.no_grad():
        token = trainer.trainable.encode().hidden_states
    torch.testing.assert_close(negative, token)
    assert not torch.allclose(positive, token)


def test_resumed_embedding_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_folders):
    whole = train(embedding_config(tiny_folders["sd1"], tmp_path / "whole"), progress=False)
    first = train(embedding_config(tiny_folders["sd1"], tmp_path / "split", iterations=3), progress=False)
    resumed = train(
        embedding_config(tiny_folders["sd1"], tmp_path / "split"), resume=first.state, progress=False
    )
    assert torch.equal(
        read_lora_file(whole.path)[0]["emb_params"], read_lora_file(resumed.path)[0]["emb_params"]
    )


def test_a_token_already_in_the_vocabulary_is_refused(tmp_path, tiny_folders):
    with pytest.raises(LecoError, match=r"network.token: 'photo' is already in this model's vocabulary"):
        Trainer(embedding_config(tiny_folders["sd1"], tmp_path, token="photo"), progress=False)
    # A word and punctuation, or the token in the run's own prompts: refused before any loading.
    with pytest.raises(LecoError, match=r"network.token: 'photo\.' is the word\(s\) photo and punctuation"):
        Trainer(embedding_config(tiny_folders["sd1"], tmp_path, token="photo."), progress=False)
    # Digits alone stand in wherever a prompt writes that number; in brackets they are a new word.
    with pytest.raises(LecoError, match=r"network.token: '77' has no letter, .*e.g. <77>$"):
        Trainer(embedding_config(tiny_folders["sd1"], tmp_path, token="77"), progress=False)
    # ...but '<>' bracketed is no word either: the example given must be one that passes
    with pytest.raises(LecoError, match=r"network.token: '<>' has no letter, .*e.g. <no-seven>$"):
        Trainer(embedding_config(tiny_folders["sd1"], tmp_path, token="<>"), progress=False)
    config = embedding_config(tiny_folders["sd1"], tmp_path, token="fox")
    with pytest.raises(ConfigError, match=r"entry 1: 'a red fox' holds 'fox', the token this run"):
        config.check_combination()


def test_a_token_inside_words_is_refused(tmp_path, tiny_folders):
    # A tokenizer reads an added token inside words: "blurr" would turn "blurry" into "blurr y".
    with pytest.raises(LecoError, match=r"network.token: 'blurr' occurs inside words the model knows \("):
        Trainer(embedding_config(tiny_folders["sd1"], tmp_path, token="blurr"), progress=False)
    config = embedding_config(tiny_folders["sd1"], tmp_path, token="ox")  # "fox" in the run's own prompts
    with pytest.raises(ConfigError, match=r"network.token: 'ox' is inside the word 'fox' of prompts entry 1"):
        config.check_combination()
    # Next to punctuation a bracketed token is still a word of its own, as the tokenizer reads it.
    config = embedding_config(tiny_folders["sd1"], tmp_path, token="<no-fox>")
    config.preview.prompts = ["a photo of a fox, (<no-fox>:1.2)"]
    config.check_combination()
    config.preview.prompts = ["a photo of a Fox2<no-fox>"]
    config.check_combination()


def test_an_init_text_holding_the_token_is_refused(tmp_path, tiny_folders):
    config = embedding_config(tiny_folders["sd1"], tmp_path, token="<q>", init_text="a <Q>")
    with pytest.raises(LecoError, match=r"network.init_text: 'a <Q>' holds the token '<q>' itself"):
        Trainer(config, progress=False)


def test_more_vectors_than_a_prompt_holds_are_refused(tmp_path, tiny_folders):
    config = embedding_config(tiny_folders["sd1"], tmp_path)
    room = DiffusionPipeline.from_pretrained(tiny_folders["sd1"]).tokenizer.model_max_length - 2
    config.network.vectors = room + 1
    message = rf"network.vectors: {room + 1} vectors do not fit .* at most {room}$"
    with pytest.raises(LecoError, match=message):
        Trainer(config, progress=False)
    config.network.vectors = room  # the most that fit still trains
    assert Trainer(config, progress=False).trainable.parameters()[0].shape[0] == room


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"network": {"token": None}},
            "network.token: type embedding needs the new word",
        ),
        ({"network": {"type": "embedding", "token": "<a>", "vectors": 0}}, "vectors"),
        ({"network": {"type": "embedding", "token": "no fox"}}, "must be one word"),
        ({"network": {"type": "embedding", "token": "<No-Fox>"}}, "has capital letters"),
        (
            {"prompts": [{"target": "a fox", "action": "distill", "guidance_scale": 3}]},
            "cannot be trained into",
        ),
        ({"train": {"rollout_guidance_scale": 1.0}}, "train.rollout_guidance_scale"),
        ({"teacher": {"name_or_path": "x"}}, "teacher: transplants train a LoRA"),
    ],
)
def test_bad_embedding_settings_are_one_line(tmp_path, tiny_folders, change, message):
    document = embedding_config(tiny_folders["sd1"], tmp_path).model_dump(mode="json")
    for key, value in change.items():
        document[key] = {**document[key], **value} if isinstance(value, dict) and document.get(key) else value
    with pytest.raises((ConfigError, ValueError)) as caught:
        LecoConfig.model_validate(document).check_combination()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("init_text", "vectors", "warned"),
    [
        ("fox", 2, []),
        ("fox qzxj", 4, ["not one per word"]),  # an unknown word is spelt in pieces (4 of them)
        ("fox red car", 2, ["only the first 2 start the vectors; set vectors: 3 to use all"]),
        # More tokens than any prompt holds: the advice is the model's limit, not a count it refuses.
        ("fox " * 100, 2, ["only the first 2 start the vectors; a prompt holds at most"]),
    ],
)
def test_an_init_text_that_does_not_start_the_vectors_as_written_is_named(
    tmp_path, tiny_folders, capsys, init_text, vectors, warned
):
    config = embedding_config(tiny_folders["sd1"], tmp_path, init_text=init_text, vectors=vectors)
    Trainer(config, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "network.init_text" in line]
    assert len(lines) == len(warned) and all(w in line for w, line in zip(warned, lines, strict=True)), lines


@pytest.mark.parametrize(("guidance", "warned"), [(1.2, True), (1.5, False), (3.0, False)])
def test_an_embedding_trained_for_guidance_near_one_is_told_what_that_costs(
    tmp_path, tiny_folders, capsys, guidance, warned
):
    from leco.embedding import TokenEmbedding

    models = load_models(str(tiny_folders["sd1"]))
    TokenEmbedding(models, "<no-fox>", cfg_scale=guidance)
    err = capsys.readouterr().err
    assert ("train.rollout_guidance_scale: 1.2 is close to 1" in err) == warned
    assert ("push 6x as far as the edit itself" in err) == warned
