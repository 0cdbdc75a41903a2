"""Drop-in replacements for other registration packages' training code, on gradicon_fast's fused ops.

- :mod:`gradicon_fast.compat.icon`: the ``icon_registration`` (GradICON, uniGradICON) loss module.
"""
