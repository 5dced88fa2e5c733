"""ImageNet-style classification: top-1 by ranking every class name (``<image>Output: {class}<|endofchunk|>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...processing.video import VIDEO_SUFFIXES
from ..metrics import top_k_accuracy
from ..task import Example, Task, register_task
from .files import memo, read_json, require_dir, require_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_CLASSNAMES_FILE = Path(__file__).with_name("imagenet_classnames.txt")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (sorted wnids, as torchvision's ImageFolder):
    CLIP's curated names, which OpenFlamingo ranks (via wise-ft). Two names repeat ("missile" for indices
    657 and 744, "sunglasses" for 836 and 837), as in that list: those classes cannot be told apart by name."""
    return IMAGENET_CLASSNAMES_FILE.read_text(encoding="utf-8").splitlines()


def read_ilsvrc2012_val(devkit_dir: str | Path, image_dir: str | Path) -> list[Example]:
    """ILSVRC2012 validation from the devkit (``ILSVRC2012_devkit_t12``): ``data/meta.mat`` maps each
    ILSVRC2012_ID (1..1000) to a wnid, ``data/ILSVRC2012_validation_ground_truth.txt`` gives image i's
    ILSVRC2012_ID on line i. Labels are indices into the *sorted* wnids (the order of
    :func:`imagenet_class_names` and of class folders), which is not the ILSVRC2012_ID order. Images:
    ``image_dir/ILSVRC2012_val_{i:08d}.JPEG``. Reading meta.mat needs scipy (the ``imagenet`` extra).
    """
    devkit = require_dir(devkit_dir, "devkit_dir")
    data = devkit / "data" if (devkit / "data").is_dir() else devkit
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading the ILSVRC2012 devkit's meta.mat needs scipy: pip install 'flamingo-vlm[imagenet]'") from e
    synsets = loadmat(str(require_file(data / "meta.mat", "devkit meta.mat")), squeeze_me=True)["synsets"]
    # the 1000 leaf classes are the synsets without children (the rest are WordNet ancestors)
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    if len(id_to_wnid) != 1000:
        raise ValueError(f"{data / 'meta.mat'}: expected 1000 leaf synsets, found {len(id_to_wnid)}")
    index = {wnid: i for i, wnid in enumerate(sorted(id_to_wnid.values()))}
    truth = require_file(data / "ILSVRC2012_validation_ground_truth.txt", "devkit validation ground truth")
    image_dir = Path(image_dir)
    out = []
    for n, line in enumerate(truth.read_text(encoding="utf-8").split(), start=1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        out.append(Example(id=name, media=[image_dir / name], fields={"label": index[id_to_wnid[int(line)]], "wnid": id_to_wnid[int(line)]}))
    return out


def load_class_names(class_names: str | Path | Sequence[str] | dict | None) -> list[str] | dict | None:
    """A list of names, a dict {folder: name}, a .json file of either, a text file with one name per line,
    or ``"imagenet"``: the built-in ImageNet-1k names (:func:`imagenet_class_names`)."""
    if class_names == "imagenet":
        return imagenet_class_names()
    if class_names is None or isinstance(class_names, (list, tuple, dict)):
        return list(class_names) if isinstance(class_names, tuple) else class_names
    path = require_file(class_names, "class_names file")
    if path.suffix == ".json":
        return read_json(path)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_list_file(list_file: str | Path, image_root: str | Path, class_names: list[str]) -> list[Example]:
    """Lines ``relative/path label``; label an index into class_names, or a class name."""
    image_root = Path(image_root)
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for n, line in enumerate(Path(list_file).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path:
            raise ValueError(f"{list_file}:{n + 1}: expected 'relative/path label', got {line!r}")
        y = int(label) if label.lstrip("-").isdigit() else index.get(label)
        if y is None or not 0 <= y < len(class_names):
            raise ValueError(f"{list_file}:{n + 1}: label {label!r} is not a class index or name")
        out.append(Example(id=path, media=[image_root / path], fields={"label": y}))
    return out


def read_class_folder(folder: str | Path, class_names: list[str] | dict | None) -> tuple[list[Example], list[str]]:
    """``folder/<class>/<image>``: classes are the sorted subfolders (ImageNet's wnids); names from class_names."""
    folder = require_dir(folder, "class folder")
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if isinstance(class_names, dict):
        names = [class_names[d.name] for d in dirs]
    elif class_names is not None:
        if len(class_names) != len(dirs):
            raise ValueError(f"{folder} has {len(dirs)} class folders but {len(class_names)} class names were given")
        names = list(class_names)
    else:
        names = [d.name for d in dirs]
    out = []
    for y, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                out.append(Example(id=f"{d.name}/{f.name}", media=[f], fields={"label": y}))
    return out, names


@register_task("classification")
@register_task("imagenet")
class Classification(Task):
    """Classification by ranking all class names; top-1 (main) and top-5.

    Data: a list file (``path label`` lines, paths relative to ``image_root``, default the list file's
    folder), a class folder (``folder/<class>/<image>``), or for the evaluated split the ILSVRC2012
    devkit (``devkit_dir`` + ``image_root``, :func:`read_ilsvrc2012_val`); the same for the support set
    (list file or folder). class_names: list, {folder: name} dict, .json, a text file with one name per
    line, or "imagenet" (built in; the default with a devkit).
    """

    name = "imagenet"
    kind = "rank"
    metric = "top1"
    prompt = "Output:"

    def __init__(
        self,
        name: str | None = None,
        list_file: str | Path | None = None,
        class_names: str | Path | Sequence[str] | dict | None = None,
        *,
        image_root: str | Path | None = None,
        folder: str | Path | None = None,
        support_list_file: str | Path | None = None,
        support_image_root: str | Path | None = None,
        support_folder: str | Path | None = None,
        devkit_dir: str | Path | None = None,
        **options,
    ) -> None:
        super().__init__(name, **options)
        if sum(x is not None for x in (list_file, folder, devkit_dir)) != 1:
            raise ValueError("give exactly one of list_file, folder or devkit_dir for the evaluated split")
        if devkit_dir is not None and class_names is None:
            class_names = "imagenet"
        self.devkit_dir = require_dir(devkit_dir, "devkit_dir") if devkit_dir else None
        if self.devkit_dir is not None and image_root is None:
            raise ValueError("devkit_dir needs image_root: the folder of ILSVRC2012_val_*.JPEG")
        if support_list_file is not None and support_folder is not None:
            raise ValueError("give at most one of support_list_file or support_folder")
        self.class_names_source = load_class_names(class_names)
        if (list_file is not None or devkit_dir is not None) and not isinstance(self.class_names_source, list):
            raise ValueError("a list file or devkit needs class_names as a list, a file with one name per line, or 'imagenet'")
        self.list_file = require_file(list_file, "list_file") if list_file else None
        self.image_root = Path(image_root) if image_root else (self.list_file.parent if self.list_file else None)
        self.folder = require_dir(folder, "folder") if folder else None
        self.support_list_file = require_file(support_list_file, "support_list_file") if support_list_file else None
        self.support_image_root = Path(support_image_root) if support_image_root else (
            self.support_list_file.parent if self.support_list_file else None
        )
        self.support_folder = require_dir(support_folder, "support_folder") if support_folder else None

    @property
    def class_names(self) -> list[str]:
        if isinstance(self.class_names_source, list):
            return self.class_names_source
        return memo(self, "names", lambda: read_class_folder(self.folder or self.support_folder, self.class_names_source)[1])

    def _read(self, list_file, image_root, folder) -> list[Example]:
        if list_file is not None:
            return read_list_file(list_file, image_root, self.class_names)
        examples, names = read_class_folder(folder, self.class_names_source)
        if names != self.class_names:
            raise ValueError(f"the class folders of {folder} differ from the task's classes")
        return examples

    def queries(self) -> list[Example]:
        if self.devkit_dir is not None:
            return memo(self, "queries", lambda: read_ilsvrc2012_val(self.devkit_dir, self.image_root))
        return memo(self, "queries", lambda: self._read(self.list_file, self.image_root, self.folder))

    def support(self) -> list[Example]:
        if self.support_list_file is None and self.support_folder is None:
            raise ValueError(f"task {self.name!r} has no support_list_file / support_folder to draw shots from")
        return memo(self, "support", lambda: self._read(self.support_list_file, self.support_image_root, self.support_folder))

    def answer(self, ex: Example) -> str:
        return self.class_names[ex.fields["label"]]

    def candidates(self, ex: Example) -> list[str]:
        return self.class_names

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        refs = [self.answer(ex) for ex in examples]
        out = {"top1": 100.0 * sum(str(p) == r for p, r in zip(predictions, refs)) / max(len(refs), 1)}
        if all(getattr(p, "scores", None) for p in predictions):
            out["top5"] = 100.0 * top_k_accuracy([p.scores for p in predictions], refs, k=5)
        return out
