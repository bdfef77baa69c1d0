// Renders TeX to HTML with the vendored KaTeX, for docs/_hooks/math.py.
//
// Usage: node katex_render.js PATH/TO/katex.min.js
// Protocol: every line on stdin is a JSON array of {"tex": str, "display": bool}; for
// each line one line goes to stdout: a JSON array, in the same order, of {"html": str}
// or {"error": str}. The process serves lines until stdin closes, so one node process
// renders a whole build.
"use strict";

const path = require("path");
const readline = require("readline");

const katex = require(path.resolve(process.argv[2]));

// strict: "error" turns KaTeX's warnings about non-standard LaTeX into errors too.
function render(item) {
  try {
    const html = katex.renderToString(item.tex, {
      displayMode: Boolean(item.display),
      throwOnError: true,
      strict: "error",
      output: "htmlAndMathml",
    });
    return { html };
  } catch (err) {
    return { error: String(err && err.message ? err.message : err) };
  }
}

const lines = readline.createInterface({ input: process.stdin, terminal: false });
lines.on("line", (line) => {
  let reply;
  try {
    reply = JSON.parse(line).map(render);
  } catch (err) {
    reply = [{ error: "bad request: " + String(err) }];
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
});
