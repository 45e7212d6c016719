"""The data errors: every error raised while locating or reading a dataset is a DatasetError."""


class DatasetError(Exception):
    """Base class of every error raised while locating or reading a dataset."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset root, a category folder or an image listed by the dataset does not exist."""


class MissingMaskError(DatasetError, FileNotFoundError):
    """An anomalous image has no ground-truth mask."""


class UnknownCategoryError(DatasetError, ValueError):
    """The requested category is not in the dataset."""


class DatasetFormatError(DatasetError, ValueError):
    """Unknown split or format, or a layout that cannot be recognised."""


class MaskSizeError(DatasetError, ValueError):
    """A mask does not have the size of its image."""


class CorruptImageError(DatasetError, ValueError):
    """An image or mask file cannot be decoded."""
