"""quantkit: post-training quantization and compression of Hugging Face transformers models.

Importing quantkit registers its checkpoint layout with transformers (when transformers is
installed), so quantkit-layout checkpoints load with AutoModelForCausalLM.from_pretrained.
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        from quantkit import hf_integration
    except ImportError:  # transformers missing or too old: the library still works without it
        return
    register = getattr(hf_integration, "register", None)
    if register is not None:
        register()


_register_with_transformers()
