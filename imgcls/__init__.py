"""imgcls: image classification. Data, models, training, metrics and profiling.

Knows nothing of hyperparameter search or experiment tracking: `hpo` builds on it, never the
other way round.
"""

from imgcls.errors import ConfigError, DataError, ImgclsError, first_line

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ImgclsError", "__version__", "first_line"]
