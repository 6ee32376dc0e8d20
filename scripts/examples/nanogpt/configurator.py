# A poor man's configurator, in the style of nanoGPT's: exec'd by train.py after its
# defaults are set as globals. Each argument is either the path of a Python file whose
# assignments override the globals, or --key=value (the value read as a Python literal,
# else kept as a string; its type must match the default's).
#   $ python train.py config/small.py --batch_size=32 --compile=False
import sys
from ast import literal_eval

for arg in sys.argv[1:]:
    if "=" not in arg:
        assert not arg.startswith("--"), f"expected --key=value, got {arg}"
        print(f"Overriding config with {arg}:")
        with open(arg) as f:
            source = f.read()
        print(source)
        exec(source)
    else:
        assert arg.startswith("--"), f"expected --key=value, got {arg}"
        key, val = arg[2:].split("=", 1)
        if key not in globals():
            raise ValueError(f"Unknown config key: {key}")
        try:
            attempt = literal_eval(val)
        except (SyntaxError, ValueError):
            attempt = val
        assert type(attempt) == type(globals()[key]), f"{key}: {attempt!r} is not a {type(globals()[key]).__name__}"
        print(f"Overriding: {key} = {attempt}")
        globals()[key] = attempt
