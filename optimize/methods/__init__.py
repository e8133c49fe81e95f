"""The methods, the fifth layer: one module each (``teacher``, ``iia``, ``ld3``, ``ddss``, ``dsno``, ``pagoda``), each
declaring its own typed keys (``KEYS``), checks (``validate``) and command (``run``) beside its code, with its defaults
and one-line help in ``conf/method/<name>.yaml``. Methods import the layers below, never each other."""
