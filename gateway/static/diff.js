// The diff viewer: a git diff split per file, each file a collapsible <details>, lines
// coloured by kind (file header, hunk header, addition, deletion, context).
import { h } from "./dom.js";

export function parseDiff(text) {
  const files = [];
  let file = null;
  for (const line of text.replace(/\n$/, "").split("\n")) {
    if (line.startsWith("diff --git ") || file === null) {
      file = { name: nameFromGitHeader(line), lines: [], adds: 0, dels: 0, inHunk: false };
      files.push(file);
    }
    let kind = "ctx";
    if (line.startsWith("diff --git ")) { kind = "file"; file.inHunk = false; }
    else if (line.startsWith("@@")) { kind = "hunk"; file.inHunk = true; }
    else if (!file.inHunk) {
      kind = "meta";
      if (line.startsWith("+++ ") && line !== "+++ /dev/null") file.name = stripPrefix(line.slice(4));
      else if (line.startsWith("--- ") && !file.name) file.name = stripPrefix(line.slice(4));
      else if (line.startsWith("rename to ")) file.name = line.slice(10);
    } else if (line.startsWith("+")) { kind = "add"; file.adds += 1; }
    else if (line.startsWith("-")) { kind = "del"; file.dels += 1; }
    else if (line.startsWith("\\")) kind = "meta";
    file.lines.push({ kind, line });
  }
  return files.filter((f) => f.lines.length);
}

function stripPrefix(path) {
  const p = path.replace(/\t.*$/, "");
  return /^[ab]\//.test(p) ? p.slice(2) : p;
}

function nameFromGitHeader(line) {
  const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
  return m ? m[2] : "";
}

export function renderDiff(text) {
  const files = parseDiff(text);
  return h("div", { class: "diff" },
    files.map((f) => h("details", { class: "diff-file", open: true, dataset: { file: f.name } },
      h("summary", {},
        h("span", { class: "diff-name" }, f.name || "(unnamed)"),
        h("span", { class: "diff-count" },
          h("span", { class: "n-add" }, `+${f.adds}`), " ", h("span", { class: "n-del" }, `−${f.dels}`))),
      h("pre", { class: "diff-body" },
        f.lines.map((l) => h("span", { class: `dl dl-${l.kind}` }, l.line, "\n"))))));
}
