"""The built-in compression methods: importing this package registers every one of them."""

from depthkit.compress.methods import attn_drop, flatten, laco, shortgpt, sleb, width  # noqa: F401
