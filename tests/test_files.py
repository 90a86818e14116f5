import os
import stat

import pytest

from leco.errors import LecoError
from leco.files import atomic_folder, atomic_output, check_output, load_torch_file


def test_written_file_gets_the_mode_plain_open_would_give(tmp_path):
    with atomic_output(tmp_path / "sub" / "a.bin") as file:
        file.write(b"abc")
    (tmp_path / "plain.bin").write_bytes(b"abc")
    mode = stat.S_IMODE(os.stat(tmp_path / "sub" / "a.bin").st_mode)
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"abc"
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_output(path) as file:
        file.write(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_a_full_disk_names_the_file_that_did_not_fit(tmp_path):
    """torch and safetensors wrap the OSError and lose its path; the user is told which file it was."""
    import errno

    target = tmp_path / "run_state" / "training_state.pt"
    with pytest.raises(OSError) as caught, atomic_output(target) as file:
        file.write(b"part")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from error
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temp file left
    with pytest.raises(ValueError), atomic_output(target):  # anything else passes through as it is
        raise ValueError("not a disk problem")


def test_a_folder_is_replaced_only_when_it_is_complete(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(folder) as staging:
        (staging / "weights").write_bytes(b"half")
        raise KeyboardInterrupt
    assert (folder / "weights").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_folder(folder) as staging:
        (staging / "weights").write_bytes(b"new")
    assert [p.name for p in folder.iterdir()] == ["weights"] and (folder / "weights").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE(os.stat(folder).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


@pytest.mark.parametrize("target", ["loop", "dangling"])
def test_an_output_through_a_symlink_that_leads_nowhere_is_one_line(tmp_path, target):
    from leco.checkpoints import RunFolder

    if target == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        link = tmp_path / "a"
    else:
        link = tmp_path / "dangling"
        link.symlink_to(tmp_path / "nowhere")
    for out in (link, link / "inside"):
        with pytest.raises(
            LecoError, match=r"^--out: .* is a symlink that leads nowhere \(dangling, or a loop\)"
        ):
            check_output(out, overwrite=False)
        with pytest.raises(LecoError, match=r"^save.path: .* is a symlink that leads nowhere"):
            RunFolder(out, "run").check(overwrite=False)


def test_an_output_inside_an_input_is_found_however_either_is_spelled(tmp_path):
    from leco.files import holds_or_is

    (tmp_path / "runs" / "real").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "real")
    assert holds_or_is(tmp_path / "runs" / "real", tmp_path / "link" / "images")
    assert holds_or_is(tmp_path / "link", tmp_path / "runs" / "x" / ".." / "real")
    assert not holds_or_is(tmp_path / "runs" / "real" / "report.json", tmp_path / "runs" / "real")


def test_a_text_file_for_a_torch_file_is_named_as_text_and_torchs_other_formats_are_not(tmp_path):
    import torch

    notes = tmp_path / "notes.pt"
    notes.write_text("é" * 255 + "\nmore", encoding="utf-8")  # 512 bytes end inside a character
    with pytest.raises(LecoError, match=r"^not a torch file: it is text \(starting 'é"):
        load_torch_file(notes)
    legacy = tmp_path / "legacy.pt"  # torch's old .tar format: text names, then NULs
    legacy.write_bytes(b"sys_info" + b"\x00" * 92 + b"0000644\x00" + b"\x00" * 400)
    with pytest.raises(LecoError) as raised:
        load_torch_file(legacy)
    assert "text" not in str(raised.value)
    torch.save({"x": torch.ones(2)}, tmp_path / "real.pt")
    assert torch.equal(load_torch_file(tmp_path / "real.pt")["x"], torch.ones(2))
