"""Drop inline <script>s that Sphinx 7.4 emits twice.

An extension that registers an inline script (filename None, a body) after the builder exists
(sphinx-thebe, sphinx-togglebutton) gets it added once as filename None and once more, in
prepare_writing, as filename ''. The second `const THEBE_JS_URL = ...` is a SyntaxError on
every page. Keep the first of each (filename or '', priority, attributes).
"""


def _dedupe(app, pagename, templatename, context, doctree):
    seen, out = set(), []
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", js) or "", getattr(js, "priority", 0),
               tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            out.append(js)
    context["script_files"] = out


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
