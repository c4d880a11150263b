"""Data for NARVL: the embedded shapes dataset, file loaders, tokenizer, metrics."""
from . import metrics, shapes
from .dataset import TaskData, load_image, sample_texts
from .loaders import SPEC_KEYS, load_coco_captions, load_refcoco, load_snli_ve, load_spec, load_vqa_v2
from .tokenizer import Tokenizer


def shapes_task(task: str, n: int, image_size: int = 64, seed: int = 0) -> TaskData:
    """``n`` generated samples of ``task`` (see ``narvl.data.shapes``)."""
    images, samples = shapes.generate(task, n, image_size, seed)
    return TaskData(task, samples, image_size, images)


__all__ = ["TaskData", "Tokenizer", "load_image", "load_vqa_v2", "load_coco_captions", "load_refcoco",
           "load_snli_ve", "load_spec", "SPEC_KEYS", "sample_texts", "metrics", "shapes", "shapes_task"]
