"""Runtime side of RecLoRA serving: everything needed to answer recommendation requests.

Never imports ``training``; offline code depends on this package, not the other way round.
"""
