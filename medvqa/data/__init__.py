from medvqa.data.datasets import (DataError, InputError, Record, Split, dataset_splits, holdout, load_split,
                                  normalize_answer)
from medvqa.data.images import ImageError, load_image
from medvqa.data.vocab import AnswerVocab

__all__ = ["AnswerVocab", "DataError", "ImageError", "InputError", "Record", "Split", "dataset_splits", "holdout",
           "load_image", "load_split", "normalize_answer"]
