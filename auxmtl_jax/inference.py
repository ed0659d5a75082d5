r"""Inference with an exported model (WORKDIR/inference/): only `main` runs, auxiliary modules are gone.

Python:

  predictor = inference.Predictor.load('workdirs/demo/auxi_all/inference')
  outputs = predictor.predict(images)    # uint8 [B,H,W,3] -> {task: array at input resolution}

Command line (writes <name>_segmentation.png, <name>_depth.png, <name>_normal.png per image):

  python -m auxmtl_jax.inference --model=workdirs/demo/auxi_all/inference --output=preds img1.png img2.jpg
"""

from __future__ import annotations

import dataclasses
import functools
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import errors
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.analysis import images
from auxmtl_jax.augment import IMAGE_MEAN, IMAGE_STD, model_input
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.models import MultiTaskModel, build_model


@dataclasses.dataclass(frozen=True)
class Predictor:
    """An exported `main` network with its preprocessing (mean/std normalisation)."""

    model: MultiTaskModel
    variables: Any
    export_config: dict

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Predictor":
        export_config = checkpoint_lib.load_inference_config(directory)
        variables = checkpoint_lib.load_inference_variables(directory)
        model_cfg = ml_collections.ConfigDict(export_config["model"])
        model = build_model(model_cfg, dict(export_config["tasks"]),
                            input_size=export_config["input"].get("crop_size"))  # for model.aspp_rates='feature'
        return cls(model, jax.tree.map(jnp.asarray, variables), export_config)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.export_config["tasks"])

    @property
    def num_classes(self) -> int | None:
        return self.export_config["tasks"].get("segmentation")

    @property
    def _mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (tuple(map(float, self.export_config["input"]["mean"])),
                tuple(map(float, self.export_config["input"]["std"])))

    @staticmethod
    def _checked(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"images: shape {images.shape}; expected [batch, height, width, 3] RGB.")
        if images.dtype != np.uint8:
            raise UserError(f"images: dtype {images.dtype}; expected uint8 RGB (0-255). Scale other ranges first, "
                             "e.g. 16-bit as round(x * 255 / 65535).")
        return images

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [B,H,W,3] -> the float input the network was trained on, on the host (`predict` does this on
        the device); any other dtype is refused."""
        mean, std = (np.asarray(values, np.float32) for values in self._mean_std)
        return (self._checked(images).astype(np.float32) - mean) / std

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{task: prediction} for uint8 RGB images; segmentation as class ids [B,H,W], the rest as the network gives.
        The uint8 images go to the device as they are and are normalised there (`augment.model_input`)."""
        outputs = _predict_fn(self.model, *self._mean_std)(self.variables, jnp.asarray(self._checked(images)))
        outputs = jax.device_get(outputs)
        if "segmentation" in outputs:
            outputs["segmentation"] = np.asarray(outputs["segmentation"]).argmax(-1).astype(np.int32)
        return {task: np.asarray(value) for task, value in outputs.items()}


@functools.lru_cache(maxsize=8)
def _predict_fn(model: MultiTaskModel, mean: tuple[float, ...] = IMAGE_MEAN, std: tuple[float, ...] = IMAGE_STD):
    """`model.predict` jitted behind `model_input`: uint8 images normalised with `mean`/`std`, floats as given."""
    return jax.jit(lambda variables, images: model.predict(variables, model_input(images, mean, std)))


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB [H,W,3]; one clear error for a missing or unreadable file.

    16-bit greyscale (e.g. PNG) is scaled from 0-65535 to 0-255, not clipped; 32-bit and float images are refused.
    """
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no such image file.")
    try:
        with Image.open(path) as image:
            return _as_uint8_rgb(image, path)
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: not a readable image ({error}); expected a PNG/JPEG file.") from None


def _as_uint8_rgb(image, path) -> np.ndarray:
    # Pillow opens 16-bit greyscale PNGs as I;16 (older versions as I); convert('RGB') would clip them at 255.
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.uint32)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise UserError(f"{path}: a {kind} image (mode {image.mode}); expected an 8- or 16-bit RGB or greyscale "
                         "image (PNG/JPEG).")
    return np.asarray(image.convert("RGB"))


def colour_outputs(outputs: dict[str, np.ndarray], num_classes: int | None) -> dict[str, np.ndarray]:
    """One uint8 RGB image per task for a single example: class colours, a depth colour map, normals as RGB."""
    coloured = {}
    if "segmentation" in outputs:
        coloured["segmentation"] = images.colorize_segmentation(outputs["segmentation"], num_classes)
    if "depth" in outputs:
        coloured["depth"] = images.colorize_depth(outputs["depth"])
    if "normal" in outputs:
        coloured["normal"] = (255 * images.normals_to_rgb(outputs["normal"])).round().astype(np.uint8)
    return coloured


def write_png(path: Path, image: np.ndarray) -> None:
    """Writes a PNG atomically (a killed run leaves no truncated file)."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_files(model_dir: str, image_paths: Sequence[str], output_dir: str) -> list[Path]:
    """Predicts every image file (one at a time, any size) and writes its coloured task PNGs."""
    workdir_lib.check_output_dir(output_dir, "--output")  # every input checked before anything is written
    images = [read_image(path) for path in image_paths]
    predictor = Predictor.load(model_dir)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in zip(image_paths, images):
        outputs = {task: value[0] for task, value in predictor.predict(image[None]).items()}
        for task, coloured in colour_outputs(outputs, predictor.num_classes).items():
            target = output / f"{Path(path).stem}_{task}.png"
            write_png(target, coloured)
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Command line; a bad input (model folder, image file) exits with status 1 and one `error: ...` line."""
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.inference",
                                   description="Predict segmentation/depth/normals for image files.")
    parser.add_argument("--model", required=True, help="an exported model folder (WORKDIR/inference)")
    parser.add_argument("--output", required=True, help="folder for the coloured prediction PNGs")
    parser.add_argument("images", nargs="+", help="input image files (PNG/JPEG)")
    args = parser.parse_args(argv)
    with errors.reported_as_one_line(args.verbose):
        written = predict_files(args.model, args.images, args.output)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
