"""Registry: registration, lookup errors, built-in lazy loading and a real entry-point plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from monai_kdx.registry import DATASETS, REGISTRIES, Registry


def test_register_get_build_and_errors():
    registry = Registry("widget")

    @registry.register("square")
    def square(x):
        return x * x

    registry.register("cube", lambda x: x**3)
    assert registry.get("square") is square
    assert registry.build("cube", 3) == 27
    assert registry.names() == ["cube", "square"]
    assert "square" in registry and "circle" not in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("square", lambda x: x)
    registry.register("square", abs, override=True)
    assert registry.get("square") is abs
    with pytest.raises(KeyError, match=r"unknown widget entry 'squar'.*Registered: \['cube', 'square'\].*'square'"):
        registry.get("squar")


def test_register_as_decorator_without_name_uses_dunder_name():
    registry = Registry("thing")

    @registry.register()
    class Gadget:
        pass

    assert registry.get("Gadget") is Gadget


def test_builtin_modules_load_lazily_on_first_lookup():
    assert set(REGISTRIES) >= {"datasets", "explainers", "relevance_methods", "distillation_losses", "saliency_losses"}
    assert {"brain-mri-3d", "chest-xray-2d", "retina-2d"} <= set(DATASETS.names())


def test_third_party_plugin_through_a_real_entry_point(tmp_path, subprocess_env):
    """A tiny package declaring a `monai_kdx.plugins` entry point is built and installed with pip."""
    package = tmp_path / "kdx_toy_plugin"
    (package / "kdx_toy_plugin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "kdx-toy-plugin"
            version = "0.1.0"

            [project.entry-points."monai_kdx.plugins"]
            toy = "kdx_toy_plugin"
            toy_fn = "kdx_toy_plugin.extra:register"
            broken = "kdx_toy_plugin.does_not_exist"

            [tool.setuptools]
            packages = ["kdx_toy_plugin"]
            """
        )
    )
    (package / "kdx_toy_plugin" / "__init__.py").write_text(
        "from monai_kdx.registry import EXPLAINERS\n\n"
        "@EXPLAINERS.register('toy-explainer')\n"
        "class ToyExplainer:\n"
        "    pass\n"
    )
    (package / "kdx_toy_plugin" / "extra.py").write_text(
        "def register():\n"
        "    from monai_kdx.registry import SALIENCY_LOSSES\n"
        "    SALIENCY_LOSSES.register('toy-loss', lambda: 'toy')\n"
    )
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(package)],
        check=True, env=subprocess_env, capture_output=True,
    )
    probe = textwrap.dedent(
        """
        import warnings
        from monai_kdx.registry import EXPLAINERS, SALIENCY_LOSSES
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls = EXPLAINERS.get("toy-explainer")
        print(cls.__module__, SALIENCY_LOSSES.build("toy-loss"))
        print(any("'broken'" in str(w.message) for w in caught))
        try:
            EXPLAINERS.get("nope")
        except KeyError as error:
            print("broken" in str(error))
        """
    )
    env = dict(subprocess_env, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["kdx_toy_plugin", "toy", "True", "True"], result.stderr
    # without the plugin on the path, the name is unknown
    result = subprocess.run(
        [sys.executable, "-c", "from monai_kdx.registry import EXPLAINERS; print('toy-explainer' in EXPLAINERS)"],
        env=subprocess_env, capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == "False"
