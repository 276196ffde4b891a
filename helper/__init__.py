"""RepDistiller's import paths (``helper.util``, ``helper.loops``, ``helper.pretrain``), kept as re-exports
for code written for RepDistiller; this library's own code never imports this package."""
