"""Start-up hook: import ``peft_persona`` right after ``peft`` is first imported.

Installed as ``peft_persona_autoload.pth`` beside this module. Neither PEFT nor transformers has a plugin entry point,
so without this hook ``model.load_adapter("user/persona-mask")`` in code that never imports ``peft_persona`` fails with
``KeyError: 'PERSONA_MASK'``. The hook costs one cheap meta-path finder and imports nothing until ``peft`` is imported.
Set ``PEFT_PERSONA_NO_AUTOLOAD=1`` to turn it off.
"""

import os
import sys

DISABLE_ENV = "PEFT_PERSONA_NO_AUTOLOAD"


class _AfterPeftImport:
    """A meta-path finder that wraps ``peft``'s loader so that ``peft_persona`` is imported once ``peft`` is."""

    _searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._searching:
            return None
        import importlib.util

        self._searching = True  # find peft's real spec with the other finders
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_register(module):
            exec_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            try:
                import peft_persona  # noqa: F401  (registers the PERSONA_MASK type with peft)
            except Exception as err:  # never break `import peft` because of this package
                import warnings

                warnings.warn(f"peft_persona could not be loaded after peft: {err!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install():
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    if "peft" in sys.modules:
        return
    if not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
