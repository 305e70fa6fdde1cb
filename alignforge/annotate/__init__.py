"""Preference annotation: web app, SQLite store, agreement metrics, AI judge, blind tests.

    alignforge annotate init ann/ && alignforge annotate add-user ann/ alice
    alignforge annotate import ann/ samples.jsonl && alignforge annotate release ann/ --batch b1
    alignforge annotate serve ann/

See docs/annotate.md. Submodules import lazily; nothing heavy is loaded here.
"""
