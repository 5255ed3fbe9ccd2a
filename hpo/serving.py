"""Where models promoted before the `hpo.after` layout find their classifier: their model code
reads `from hpo.serving import ImageClassifier`. New promotions name hpo.after.serving."""

from hpo.after.serving import ImageClassifier

__all__ = ["ImageClassifier"]
