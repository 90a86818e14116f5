import os
import stat

import pytest

from leco.files import atomic_output


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
