"""medvqa: CMI-MTL and CMDPI for medical visual question answering, with an explainability workbench."""

__version__ = "0.1.0"
