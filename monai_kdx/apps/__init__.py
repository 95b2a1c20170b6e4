"""Applications built on the library, as MONAI keeps ``monai.apps``: the main job's pipeline and the
explanation-comparison command. Nothing in the library imports from here."""

from __future__ import annotations
