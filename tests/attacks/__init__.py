"""The attack list: hostile inputs a new contributor can extend.

One module per kind of attack (hostile servers, SSRF addresses from the IANA special-purpose
registries, corrupt artefacts of every format, option fuzzing, concurrent runs). Each test names
the guarantee it checks; RELIABILITY.md lists them.
"""
