"""jinja2 templates of every generated file (rendered with StrictUndefined by dcn_tvm.render)."""
