// The CodeTogether dashboard: one page, hash routes, plain DOM.
//
// Everything the relay sends is untrusted text (Claude's output, file names, diffs, user names), so every node
// is built with createElement/textContent — never innerHTML — and Markdown goes through the small renderer
// below, which only ever creates a fixed set of elements. The CSP forbids inline script and style, so styling is
// by class only. The CSRF token lives in memory only (from GET /me) and goes with every POST and DELETE.
(function () {
  "use strict";

  const API = "/dashboard/api";
  const MODES = ["default", "acceptEdits", "plan", "bypassPermissions"];
  const STATES = ["open", "queued", "running", "waiting_approval", "done", "failed", "cancelled", "lost"];
  const PROMPT_MAX = 16000;

  // ---------------------------------------------------------------------------------------------------------
  // Small DOM helpers

  /** Creates an element; `props` sets className/text/attributes, `kids` are nodes or strings (as text). */
  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "class") el.className = value;
        else if (key === "text") el.textContent = String(value);
        else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
        else if (key === "dataset") for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
        else if (value === true) el.setAttribute(key, "");
        else el.setAttribute(key, String(value));
      }
    }
    append(el, kids);
    return el;
  }

  function append(el, kids) {
    for (const kid of kids.flat(Infinity)) {
      if (kid === undefined || kid === null || kid === false) continue;
      el.appendChild(typeof kid === "string" || typeof kid === "number" ? document.createTextNode(String(kid)) : kid);
    }
    return el;
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  let idCounter = 0;
  /** A labelled form field: label + control, ids unique unless given. */
  function field(labelText, control, hint) {
    if (!control.id) control.id = "f" + ++idCounter;
    return h("div", { class: "field" }, h("label", { for: control.id, text: labelText }), control,
      hint ? h("span", { class: "hint muted", text: hint }) : null);
  }

  /** The questions of an AskUserQuestion input: [{text, options: [label], multi}], only well-formed ones. */
  function questionsOf(input) {
    const qs = input && Array.isArray(input.questions) ? input.questions : [];
    return qs.slice(0, 20).map((q) => ({
      text: String((q && (q.question || q.header)) || ""),
      options: (Array.isArray(q && q.options) ? q.options : []).slice(0, 20)
        .map((o) => String(o && typeof o === "object" ? o.label || "" : o || "")).filter(Boolean),
      multi: Boolean(q && q.multiSelect),
    })).filter((q) => q.text && q.options.length);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Formatting

  function now() {
    return Math.floor(Date.now() / 1000);
  }

  /** "3 min ago", "in 2 h", "just now" from unix seconds. */
  function relTime(unix, at) {
    if (typeof unix !== "number" || !isFinite(unix)) return "unknown";
    const diff = (at === undefined ? now() : at) - unix;
    const abs = Math.abs(diff);
    let text;
    if (abs < 45) return "just now";
    if (abs < 3600) text = Math.round(abs / 60) + " min";
    else if (abs < 86400) text = Math.round(abs / 3600) + " h";
    else text = Math.round(abs / 86400) + " d";
    return diff >= 0 ? text + " ago" : "in " + text;
  }

  function absTime(unix) {
    if (typeof unix !== "number" || !isFinite(unix)) return "";
    const d = new Date(unix * 1000);
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  /** A <time> showing relative time, the exact time on hover. */
  function timeEl(unix, prefix, cls) {
    const ok = typeof unix === "number" && isFinite(unix);
    return h("time", { class: cls || null, datetime: ok ? new Date(unix * 1000).toISOString() : null,
      title: absTime(unix), text: (prefix || "") + relTime(unix),
      dataset: ok ? { unix, prefix: prefix || "" } : null });
  }

  /** Keeps "5 min ago" true while a page stays open. */
  function refreshTimes() {
    for (const el of document.querySelectorAll("time[data-unix]")) {
      el.textContent = el.dataset.prefix + relTime(Number(el.dataset.unix));
    }
  }

  /** 950 -> "950", 150000 -> "150.0k", 1000000 -> "1.0M". */
  function tokens(n) {
    if (typeof n !== "number" || !isFinite(n)) return "0";
    if (n < 1000) return String(Math.round(n));
    if (n < 1e6) return (n / 1000).toFixed(1) + "k";
    return (n / 1e6).toFixed(1) + "M";
  }

  function usd(n) {
    if (typeof n !== "number" || !isFinite(n)) return "$0.00";
    return "$" + (n < 1 ? n.toFixed(4) : n.toFixed(2));
  }

  function contextText(tok, window) {
    if (typeof window === "number" && window > 0) {
      return "context " + tokens(tok) + " of " + tokens(window) + " (" + Math.round((tok / window) * 100) + "%)";
    }
    return "context " + tokens(tok);
  }

  function firstLine(text, max) {
    const line = String(text || "").split("\n").find((l) => l.trim() !== "") || "";
    const t = line.trim();
    return t.length > max ? t.slice(0, max - 1) + "…" : t;
  }

  function byteLen(s) {
    return new TextEncoder().encode(s).length;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Markdown: a deliberately small renderer into DOM nodes. Supports fenced code, headings, lists (nested by
  // indentation), block quotes, rules, paragraphs; inline code, bold, italic, links (http/https only) and bare
  // http(s) URLs. Anything it does not understand stays plain text, which is always safe.

  function safeUrl(url) {
    try {
      const u = new URL(url);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(url, kids) {
    const a = h("a", { href: url, rel: "noopener noreferrer", target: "_blank" });
    return append(a, kids);
  }

  /** Finds `delim` closing after `from`, not directly after whitespace (so "a * b" is not italic). `memo` keeps
   * the last answer per delimiter: the nearest closer after `from` is also the nearest after any later start
   * before it, so a text full of unmatched openers (64 KiB of "*a ") costs one scan, not one per opener. */
  function findClose(text, delim, from, memo) {
    const last = memo && memo[delim];
    if (last && from >= last.from && (last.at === -1 || from < last.at)) return last.at;
    let i = from;
    let at = -1;
    while ((i = text.indexOf(delim, i)) !== -1) {
      if (i > from && !/\s/.test(text[i - 1])) {
        at = i;
        break;
      }
      i += 1;
    }
    if (memo) memo[delim] = { from, at };
    return at;
  }

  /** Inline Markdown to an array of nodes. `depth` bounds nesting so hostile input cannot recurse deeply. */
  function inline(text, depth) {
    depth = depth || 0;
    const out = [];
    const memo = {}; // see findClose; also "no closing backtick run of this length" per run
    let buf = "";
    const flush = () => {
      if (buf) out.push(document.createTextNode(buf));
      buf = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && i + 1 < text.length && /[\\`*_[\]()#+\-.!>~|]/.test(text[i + 1])) {
        buf += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        let n = 1;
        while (text[i + n] === "`") n++;
        const fence = "`".repeat(n);
        const key = "code" + n;
        const end = memo[key] === -1 ? -1 : text.indexOf(fence, i + n);
        if (end === -1) memo[key] = -1;
        if (end !== -1) {
          flush();
          let code = text.slice(i + n, end);
          if (/^ .* $/.test(code)) code = code.slice(1, -1);
          out.push(h("code", { text: code }));
          i = end + n;
          continue;
        }
        buf += fence;
        i += n;
        continue;
      }
      if (depth < 8 && (c === "*" || c === "_")) {
        const strong = text[i + 1] === c;
        const delim = strong ? c + c : c;
        const start = i + delim.length;
        const prevWord = i > 0 && /\w/.test(text[i - 1]);
        // Underscores inside words (snake_case) are not emphasis.
        const opens = start < text.length && !/\s/.test(text[start]) && !(c === "_" && prevWord);
        if (opens) {
          const end = findClose(text, delim, start, memo);
          const nextWord = end !== -1 && /\w/.test(text[end + delim.length] || "");
          if (end !== -1 && !(c === "_" && nextWord) && !(strong === false && text[end + 1] === c)) {
            flush();
            out.push(append(h(strong ? "strong" : "em"), inline(text.slice(start, end), depth + 1)));
            i = end + delim.length;
            continue;
          }
        }
        buf += delim;
        i += delim.length;
        continue;
      }
      if (c === "[" && depth < 8) {
        const m = /^\[([^\]\n]{1,1000})\]\(\s*<?([^()\s<>]{1,4000})>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(i, i + 5200));
        if (m) {
          flush();
          const url = safeUrl(m[2]);
          const kids = inline(m[1], depth + 1);
          out.push(url ? link(url, kids) : append(h("span"), kids));
          i += m[0].length;
          continue;
        }
      }
      if ((c === "h" || c === "H") && (i === 0 || /[\s(<]/.test(text[i - 1]))) {
        const m = /^https?:\/\/[^\s<>"']+/i.exec(text.slice(i, i + 4000));
        if (m) {
          let raw = m[0].replace(/[.,;:!?)\]]+$/, "");
          const url = safeUrl(raw);
          if (url) {
            flush();
            out.push(link(url, [raw]));
            i += raw.length;
            continue;
          }
        }
      }
      buf += c;
      i += 1;
    }
    flush();
    return out;
  }

  /** Appends inline text with line breaks kept as <br> (Claude's paragraphs often rely on single newlines). */
  function inlineLines(lines) {
    const nodes = [];
    lines.forEach((line, n) => {
      if (n > 0) nodes.push(h("br"));
      nodes.push(...inline(line));
    });
    return nodes;
  }

  const LIST_RE = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  /** Block Markdown to a <div class="md">. `depth` counts block quotes, bounded so ">>>>…" cannot recurse deep. */
  function renderMarkdown(src, depth) {
    depth = depth || 0;
    const root = h("div", { class: "md" });
    const lines = String(src || "").replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const endPara = () => {
      if (para.length) root.appendChild(append(h("p"), inlineLines(para)));
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/.exec(line);
      if (fence) {
        endPara();
        const close = fence[1];
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trimStart().startsWith(close)) body.push(lines[i++]);
        i++; // the closing fence (or past the end when it was never closed)
        root.appendChild(codeBlock(body.join("\n").replace(/\n+$/, ""), fence[2]));
        continue;
      }
      const heading = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
      if (heading) {
        endPara();
        // Claude's h1 would compete with the page's own headings; shift them down two levels.
        const level = Math.min(6, heading[1].length + 2);
        root.appendChild(append(h("h" + level), inline(heading[2])));
        i++;
        continue;
      }
      if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
        endPara();
        root.appendChild(h("hr"));
        i++;
        continue;
      }
      if (depth < 6 && /^\s{0,3}>/.test(line)) {
        endPara();
        const quoted = [];
        while (i < lines.length && /^\s{0,3}>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s{0,3}>\s?/, ""));
        const q = h("blockquote");
        q.appendChild(renderMarkdown(quoted.join("\n"), depth + 1));
        root.appendChild(q);
        continue;
      }
      if (line.includes("|") && isTableSep(lines[i + 1] || "")) {
        endPara();
        const rows = [line];
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") rows.push(lines[i++]);
        root.appendChild(mdTable(rows));
        continue;
      }
      if (LIST_RE.test(line)) {
        endPara();
        const res = parseList(lines, i, 0);
        root.appendChild(res.el);
        i = res.next;
        continue;
      }
      if (line.trim() === "") {
        endPara();
        i++;
        continue;
      }
      para.push(line.trim());
      i++;
    }
    endPara();
    return root;
  }

  /** "| --- | :-: |": the line under a table's header. A plain check, no backtracking regex on hostile lines. */
  function isTableSep(line) {
    const t = line.trim();
    return t.includes("|") && t.includes("-") && /^[|:\- \t]+$/.test(t);
  }

  /** Cells of a table row: split on unescaped pipes, outer pipes optional; at most 50 kept. */
  function tableCells(row) {
    let t = row.trim();
    if (t.startsWith("|")) t = t.slice(1);
    if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
    return t.split(/(?<!\\)\|/).slice(0, 50).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  /** A GitHub-style table (Claude writes many), scrolling inside its own box on a narrow screen. */
  function mdTable(rows) {
    const head = tableCells(rows[0]);
    const body = rows.slice(1).map((r) => h("tr", null, tableCells(r).map((c) => append(h("td"), inline(c)))));
    return h("div", { class: "table-wrap" }, h("table", { class: "md-table" },
      h("thead", null, h("tr", null, head.map((c) => append(h("th", { scope: "col" }), inline(c))))),
      h("tbody", null, body)));
  }

  function indentOf(s) {
    return s.replace(/\t/g, "    ").match(/^ */)[0].length;
  }

  /** Parses a list starting at `start`; deeper-indented items become nested lists. */
  function parseList(lines, start, depth) {
    const first = LIST_RE.exec(lines[start]);
    const baseIndent = indentOf(first[1]);
    const ordered = /\d/.test(first[2]);
    const list = h(ordered ? "ol" : "ul");
    if (ordered) {
      const n = parseInt(first[2], 10);
      if (n !== 1) list.setAttribute("start", String(n));
    }
    let i = start;
    let item = null;
    let itemLines = [];
    const endItem = () => {
      if (item) append(item, inlineLines(itemLines));
      itemLines = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const m = LIST_RE.exec(line);
      if (m) {
        const ind = indentOf(m[1]);
        if (ind > baseIndent + 1 && item && depth < 6) {
          endItem();
          const sub = parseList(lines, i, depth + 1);
          item.appendChild(sub.el);
          i = sub.next;
          continue;
        }
        if (ind < baseIndent || /\d/.test(m[2]) !== ordered) break;
        endItem();
        item = h("li");
        list.appendChild(item);
        itemLines = [m[3]];
        i++;
        continue;
      }
      if (line.trim() === "") {
        // A blank line ends the list unless the next line carries on with an item or an indented text.
        const next = lines[i + 1];
        if (next !== undefined && (LIST_RE.test(next) && indentOf(next) >= baseIndent)) {
          i++;
          continue;
        }
        break;
      }
      if (item && indentOf(line) > baseIndent && !/^\s*(```|~~~)/.test(line)) {
        itemLines.push(line.trim());
        i++;
        continue;
      }
      if (item && !/^\s*(#|>|```|~~~)/.test(line) && lines[i - 1] && lines[i - 1].trim() !== "") {
        // A lazy continuation line of the item's paragraph.
        itemLines.push(line.trim());
        i++;
        continue;
      }
      break;
    }
    endItem();
    return { el: list, next: i };
  }

  /** A fenced code block; coloured when the fence names a language we know. */
  function codeBlock(code, lang) {
    const langKey = langFor(lang);
    const codeEl = h("code", { class: langKey ? "lang-" + langKey : null });
    if (langKey) {
      const state = { inBlock: false };
      code.split("\n").forEach((line, n) => {
        if (n > 0) codeEl.appendChild(document.createTextNode("\n"));
        append(codeEl, highlightLine(line, langKey, state));
      });
    } else {
      codeEl.textContent = code;
    }
    return h("pre", { class: "code", tabindex: "0" }, codeEl);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Syntax colouring: a small per-line tokenizer for strings, comments, numbers and keywords. It only wraps
  // pieces of the text in <span class="tok-..."> built with textContent, so a wrong guess costs colour, never
  // safety.

  const KEYWORDS = {
    js: "async await break case catch class const continue debugger default delete do else export extends false finally for from function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while with yield interface type enum implements readonly private public protected",
    rust: "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while Some None Ok Err",
    py: "and as assert async await break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return True try while with yield self",
    go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
    c: "auto break case char const continue default do double else enum extern float for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void volatile while bool true false NULL class namespace template typename public private protected virtual new delete this nullptr using try catch throw",
    java: "abstract boolean break byte case catch char class const continue default do double else enum extends final finally float for if implements import instanceof int interface long native new null package private protected public return short static super switch synchronized this throw throws try void volatile while true false var val fun when object",
    sh: "if then else elif fi for while until do done case esac in function return local export readonly set unset exit",
    sql: "select from where insert into update delete create table drop alter index join left right inner outer on and or not null as order by group having limit values primary key references default",
    ruby: "begin break case class def do else elsif end ensure false for if in module next nil not or redo rescue retry return self super then true undef unless until when while yield",
    generic: "if else for while return function class const let var true false null",
  };
  const KEYWORD_SETS = {};
  for (const [k, words] of Object.entries(KEYWORDS)) KEYWORD_SETS[k] = new Set(words.split(" "));
  for (const k of ["sql"]) for (const w of [...KEYWORD_SETS[k]]) KEYWORD_SETS[k].add(w.toUpperCase());

  const LANG_ALIASES = {
    js: "js", javascript: "js", mjs: "js", cjs: "js", jsx: "js", ts: "js", tsx: "js", typescript: "js", json: "js",
    rs: "rust", rust: "rust",
    py: "py", python: "py",
    go: "go", golang: "go",
    c: "c", h: "c", cc: "c", cpp: "c", cxx: "c", hpp: "c", "c++": "c", cs: "c", csharp: "c", swift: "c",
    java: "java", kt: "java", kotlin: "java", scala: "java",
    sh: "sh", bash: "sh", zsh: "sh", shell: "sh", console: "sh", dockerfile: "sh",
    sql: "sql",
    rb: "ruby", ruby: "ruby",
    toml: "generic", yaml: "generic", yml: "generic", ini: "generic", css: "generic", html: "generic", xml: "generic",
    lua: "generic", php: "generic",
  };

  /** A language key from a fence info string or a file name; null when unknown. */
  function langFor(name) {
    if (!name) return null;
    let n = String(name).toLowerCase();
    const base = n.split("/").pop();
    if (base === "dockerfile" || base === "makefile") return "sh";
    if (base.includes(".")) n = base.split(".").pop();
    return LANG_ALIASES[n] || null;
  }

  function commentStyle(lang) {
    if (lang === "py" || lang === "sh" || lang === "ruby" || lang === "generic") return { line: ["#"], block: lang === "generic" ? ["/*", "*/"] : null };
    if (lang === "sql") return { line: ["--"], block: ["/*", "*/"] };
    return { line: ["//"], block: ["/*", "*/"] };
  }

  /** Tokens of one line as nodes; `state.inBlock` carries an open block comment to the next line. */
  function highlightLine(line, lang, state) {
    const out = [];
    const words = KEYWORD_SETS[lang] || KEYWORD_SETS.generic;
    const cs = commentStyle(lang);
    let plain = "";
    const flush = () => {
      if (plain) out.push(document.createTextNode(plain));
      plain = "";
    };
    const span = (cls, text) => {
      flush();
      out.push(h("span", { class: "tok-" + cls, text }));
    };
    let i = 0;
    if (state && state.inBlock && cs.block) {
      const end = line.indexOf(cs.block[1]);
      if (end === -1) {
        if (line) span("comment", line);
        return out;
      }
      span("comment", line.slice(0, end + cs.block[1].length));
      i = end + cs.block[1].length;
      state.inBlock = false;
    }
    while (i < line.length) {
      const rest = line.slice(i);
      const c = line[i];
      if (cs.line.some((p) => rest.startsWith(p)) && !(lang === "sh" && i > 0 && /\S/.test(line[i - 1]) && c === "#")) {
        span("comment", rest);
        break;
      }
      if (cs.block && rest.startsWith(cs.block[0])) {
        const end = line.indexOf(cs.block[1], i + cs.block[0].length);
        if (end === -1) {
          span("comment", rest);
          if (state) state.inBlock = true;
          break;
        }
        span("comment", line.slice(i, end + cs.block[1].length));
        i = end + cs.block[1].length;
        continue;
      }
      if (c === '"' || c === "'" || c === "`") {
        // Rust lifetimes ('a) are not strings.
        if (!(c === "'" && lang === "rust" && /^'[A-Za-z_]\w*(?!')/.test(rest) && rest[2] !== "'")) {
          let j = i + 1;
          while (j < line.length && line[j] !== c) j += line[j] === "\\" ? 2 : 1;
          span("string", line.slice(i, Math.min(j + 1, line.length)));
          i = Math.min(j + 1, line.length);
          continue;
        }
      }
      if (/[0-9]/.test(c) && (i === 0 || !/[\w$]/.test(line[i - 1]))) {
        const m = /^(0x[0-9a-fA-F_]+|\d[\d_]*(\.\d+)?([eE][+-]?\d+)?)[a-zA-Z0-9_]*/.exec(rest);
        span("number", m[0]);
        i += m[0].length;
        continue;
      }
      if (/[A-Za-z_$]/.test(c)) {
        const m = /^[A-Za-z_$][\w$]*/.exec(rest);
        if (words.has(m[0])) span("keyword", m[0]);
        else plain += m[0];
        i += m[0].length;
        continue;
      }
      plain += c;
      i += 1;
    }
    flush();
    return out;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Unified diffs: one <span class="line add|del|hunk|header|ctx"> per line, code coloured by the file's language.

  /** The kind of one diff line. Inside a hunk the "@@ -a,b +c,d @@" counts decide, so a removed "-- comment"
   * (shown as "--- comment") stays a deletion instead of passing for a file header. */
  function diffLineClass(line, hunk) {
    if (hunk.old > 0 || hunk.new > 0) {
      const c = line[0];
      if (c === "+") {
        hunk.new--;
        return "add";
      }
      if (c === "-") {
        hunk.old--;
        return "del";
      }
      if (c === "\\") return "note";
      if (c === " " || line === "") {
        hunk.old--;
        hunk.new--;
        return "ctx";
      }
      hunk.old = hunk.new = 0; // a malformed hunk: fall back to reading each line on its own
    }
    const m = /^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@/.exec(line);
    if (m) {
      hunk.old = m[1] === undefined ? 1 : Number(m[1]);
      hunk.new = m[2] === undefined ? 1 : Number(m[2]);
      return "hunk";
    }
    if (/^(diff --git |index |--- |\+\+\+ |new file mode|deleted file mode|similarity index|rename (from|to) |old mode|new mode|Binary files)/.test(line)) return "header";
    if (line.startsWith("@@")) return "hunk";
    if (line.startsWith("+")) return "add";
    if (line.startsWith("-")) return "del";
    if (line.startsWith("\\")) return "note";
    return "ctx";
  }

  function renderDiff(text, cut) {
    const code = h("code");
    let lang = null;
    const state = { inBlock: false };
    const hunk = { old: 0, new: 0 };
    const lines = String(text || "").replace(/\n$/, "").split("\n");
    lines.forEach((line, n) => {
      const cls = diffLineClass(line, hunk);
      if (cls === "header") {
        const m = /^(?:\+\+\+ |--- )(?:[ab]\/)?(\S+)/.exec(line) || /^diff --git a\/(\S+)/.exec(line);
        if (m && m[1] !== "/dev/null") lang = langFor(m[1]);
        state.inBlock = false;
      }
      if (cls === "hunk") state.inBlock = false;
      const el = h("span", { class: "line " + cls });
      if ((cls === "add" || cls === "del" || cls === "ctx") && lang) {
        el.appendChild(h("span", { class: "prefix", text: line.slice(0, 1) }));
        append(el, highlightLine(line.slice(1), lang, state));
      } else {
        el.textContent = line;
      }
      if (n > 0) code.appendChild(document.createTextNode("\n"));
      code.appendChild(el);
    });
    const box = h("div", { class: "diff" }, h("pre", { class: "diff-body", tabindex: "0" }, code));
    if (cut) box.appendChild(h("p", { class: "cut muted", text: "The diff was longer and was cut." }));
    return box;
  }

  // ---------------------------------------------------------------------------------------------------------
  // API

  const state = { user: null, csrf: null, session: null, signedOut: false };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
    const opts = { method, credentials: "same-origin", headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(API + path, opts);
    } catch (e) {
      throw new ApiError(0, "The relay could not be reached: check your connection and try again.");
    }
    let data = null;
    if (res.status !== 204) {
      const text = await res.text();
      if (text) {
        try {
          data = JSON.parse(text);
        } catch (e) {
          data = null;
        }
      }
    }
    if (!res.ok) {
      const message = data && typeof data.error === "string" && data.error
        ? data.error
        : "The relay answered " + res.status + ": try again in a moment.";
      if (res.status === 401) showSignedOut(message);
      throw new ApiError(res.status, message);
    }
    return data;
  }

  function showError(err) {
    if (err && err.status === 401) return; // the signed-out view says it
    const box = document.getElementById("alert");
    const text = document.getElementById("alert-text");
    if (!box || !text) return;
    text.textContent = err && err.message ? err.message : String(err);
    box.hidden = false;
  }

  function clearError() {
    const box = document.getElementById("alert");
    if (box) box.hidden = true;
  }

  /** Runs an async action from a button or form, disabling `btn` meanwhile and showing any error. */
  async function act(btn, fn) {
    if (btn) btn.disabled = true;
    clearError();
    try {
      return await fn();
    } catch (e) {
      showError(e);
      return undefined;
    } finally {
      if (btn && btn.isConnected) btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Views and routing

  let routeGen = 0; // bumps on each navigation; late answers for an old view are dropped
  let live = null; // the task page's EventSource, closed on navigation (the relay allows 6 per session)

  function main() {
    return document.getElementById("main");
  }

  function closeLive() {
    if (live) live.close();
    live = null;
  }

  function showSignedOut(message) {
    closeLive();
    state.signedOut = true;
    state.csrf = null;
    routeGen++;
    const top = document.getElementById("top");
    if (top) top.hidden = true;
    const m = main();
    if (!m) return;
    clear(m).appendChild(h("section", { id: "signed-out", "aria-labelledby": "signed-out-h" },
      h("h1", { id: "signed-out-h", text: "Signed out" }),
      h("p", { text: "Sign in by typing /dashboard in Discord." }),
      message && message !== "Sign in: type /dashboard in Discord." ? h("p", { class: "muted", text: message }) : null));
  }

  function view(id, title, ...kids) {
    return h("section", { id, class: "view", "aria-labelledby": id + "-h" },
      h("h1", { id: id + "-h", tabindex: "-1", text: title }), ...kids);
  }

  function parseRoute(hash) {
    const path = String(hash || "").replace(/^#\/?/, "").split("?")[0];
    const parts = path.split("/").filter(Boolean).map((p) => {
      try {
        return decodeURIComponent(p);
      } catch (e) {
        return p;
      }
    });
    const name = parts[0] || "agents";
    if (name === "task" && parts[1]) return { name: "task", id: parts[1] };
    if (["agents", "tasks", "new", "shares", "audit", "usage", "sessions"].includes(name)) return { name };
    return { name: "agents" };
  }

  async function route(focus) {
    if (state.signedOut) return;
    closeLive();
    clearError();
    const gen = ++routeGen;
    const r = parseRoute(location.hash);
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.dataset.route === r.name || (r.name === "task" && a.dataset.route === "tasks")) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    const m = main();
    clear(m).appendChild(h("p", { class: "muted", text: "Loading…" }));
    const views = { agents: agentsView, tasks: tasksView, task: taskView, new: newTaskView, shares: sharesView,
      audit: auditView, usage: usageView, sessions: sessionsView };
    try {
      const el = await views[r.name](r, gen);
      if (gen !== routeGen || !el) return;
      clear(m).appendChild(el);
      if (focus) {
        const h1 = el.querySelector("h1");
        if (h1) h1.focus();
      }
      if (el.afterMount) el.afterMount();
    } catch (e) {
      if (gen !== routeGen) return;
      clear(m);
      showError(e);
    }
  }

  function table(headers, rows, cls) {
    return h("div", { class: "table-wrap" },
      h("table", { class: cls || null },
        h("thead", null, h("tr", null, headers.map((t) => h("th", { scope: "col", text: t })))),
        h("tbody", null, rows)));
  }

  function userLabel(id) {
    return id === state.user ? "you" : String(id);
  }

  // Agents ----------------------------------------------------------------------------------------------------

  async function agentsView() {
    const agents = await api("GET", "/agents");
    const list = h("ul", { class: "cards" });
    for (const a of agents || []) {
      const online = Boolean(a.online);
      const hasSince = typeof a.since === "number";
      const since = hasSince ? timeEl(a.since, online ? "online since " : "last seen ", "since")
        : h("span", { class: "since", text: online ? "online" : "offline" });
      const projects = (a.projects || []).map((p) => h("li", null, h("span", { class: "project-name", text: p.name }),
        " → ", h("code", { class: "project-path", text: p.path })));
      list.appendChild(h("li", { class: "card agent" + (online ? " is-online" : ""), dataset: { name: a.name } },
        h("h2", null,
          h("span", { class: "dot online" + (online ? " on" : " off"), role: "img", "aria-label": online ? "online" : "offline", title: online ? "online" : "offline" }),
          " ", h("span", { class: "agent-name", text: a.name }),
          a.default ? h("span", { class: "badge default", text: "default" }) : null),
        h("p", { class: "status" }, since),
        h("dl", { class: "facts" },
          h("dt", { text: "Transport" }), h("dd", { class: "transport", text: a.transport || "—" }),
          h("dt", { text: "Version" }), h("dd", { class: "version", text: a.version || "—" }),
          a.mine ? null : [h("dt", { text: "Owner" }), h("dd", { class: "owner", text: String(a.owner) })],
          a.fingerprint ? [h("dt", { text: "Fingerprint" }), h("dd", null, h("code", { class: "fingerprint", text: a.fingerprint }))] : null),
        projects.length ? h("ul", { class: "projects" }, projects) : h("p", { class: "muted", text: "No projects." })));
    }
    return view("agents", "Agents", (agents || []).length ? list
      : h("p", { class: "muted", text: "No agents yet. Pair one from Discord with /register pair." }));
  }

  // Tasks -----------------------------------------------------------------------------------------------------

  const taskFilters = { agent: "", project: "", state: "", requester: "" };

  function stateBadge(s, id) {
    return h("span", { class: "badge state state-" + String(s || "unknown"), id: id || null, text: String(s || "unknown").replace(/_/g, " ") });
  }

  function taskRow(t) {
    // data-label names each cell for the narrow-screen layout, where rows become cards.
    return h("tr", { class: "task", dataset: { id: t.id } },
      h("td", { "data-label": "Task" }, h("a", { href: "#/task/" + encodeURIComponent(t.id), class: "task-link", text: t.id })),
      h("td", { class: "prompt", "data-label": "Prompt", title: firstLine(t.prompt, 500), text: firstLine(t.prompt, 80) }),
      h("td", { "data-label": "Project", text: t.project || "—" }),
      h("td", { "data-label": "Agent", text: t.agent || "—" }),
      h("td", { "data-label": "Requester", text: userLabel(t.requester) }),
      h("td", { "data-label": "State" }, stateBadge(t.state)),
      h("td", { "data-label": "Age" }, timeEl(t.created_at)));
  }

  async function tasksView(r, gen) {
    const agents = await api("GET", "/agents").catch(() => []);
    const agentSel = h("select", { name: "agent", id: "filter-agent" }, h("option", { value: "", text: "any" }),
      (agents || []).map((a) => h("option", { value: a.name, text: a.name })));
    const stateSel = h("select", { name: "state", id: "filter-state" }, h("option", { value: "", text: "any" }),
      STATES.map((s) => h("option", { value: s, text: s.replace(/_/g, " ") })));
    const project = h("input", { type: "text", name: "project", id: "filter-project", autocomplete: "off" });
    const requester = h("input", { type: "text", name: "requester", id: "filter-requester", inputmode: "numeric", autocomplete: "off" });
    agentSel.value = taskFilters.agent;
    stateSel.value = taskFilters.state;
    project.value = taskFilters.project;
    requester.value = taskFilters.requester;
    const tbody = h("tbody");
    const more = h("button", { type: "button", id: "tasks-more", text: "More" });
    const empty = h("p", { class: "muted", id: "tasks-empty", text: "No tasks match.", hidden: true });
    let page = 0;
    const load = async (reset) => {
      if (reset) page = 0;
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(taskFilters)) if (v) q.set(k, v);
      q.set("page", String(page));
      const res = await api("GET", "/tasks?" + q.toString());
      if (gen !== routeGen) return;
      if (reset) clear(tbody);
      for (const t of res.tasks || []) tbody.appendChild(taskRow(t));
      more.hidden = !res.more;
      empty.hidden = tbody.childElementCount > 0;
      page += 1;
    };
    const form = h("form", { class: "filters", id: "task-filters" },
      field("Agent", agentSel), field("Project", project), field("State", stateSel), field("Requester", requester),
      h("div", { class: "actions" }, h("button", { type: "submit", text: "Filter" })));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      taskFilters.agent = agentSel.value;
      taskFilters.state = stateSel.value;
      taskFilters.project = project.value.trim();
      taskFilters.requester = requester.value.trim();
      act(form.querySelector("button[type=submit]"), () => load(true));
    });
    more.addEventListener("click", () => act(more, () => load(false)));
    await load(true);
    return view("tasks", "Tasks", form,
      h("div", { class: "table-wrap" }, h("table", { class: "tasks" },
        h("thead", null, h("tr", null, ["Task", "Prompt", "Project", "Agent", "Requester", "State", "Age"].map((t) => h("th", { scope: "col", text: t })))),
        tbody)),
      empty, h("p", null, more));
  }

  // Task page -------------------------------------------------------------------------------------------------

  async function taskView(r, gen) {
    const data = await api("GET", "/tasks/" + encodeURIComponent(r.id));
    const t = data.task;
    const page = new TaskPage(data, gen);
    const el = view("task", "Task " + t.id, page.header, page.usage, page.conversation, page.controls);
    for (const item of data.events || []) page.apply(item);
    el.afterMount = () => page.startLive();
    return el;
  }

  class TaskPage {
    constructor(data, gen) {
      this.gen = gen;
      this.task = data.task;
      this.id = data.task.id;
      this.canApprove = Boolean(data.can_approve);
      this.approver = data.approver;
      this.canCancel = Boolean(data.can_cancel);
      this.open = Boolean(data.open);
      this.lastSeq = 0;
      this.tools = new Map(); // tool_use_id -> block
      this.openTools = []; // blocks without a result yet, in order
      this.approvals = new Map(); // approval id -> card
      this.usageSums = { input: 0, output: 0, cost: 0, turns: 0 };
      this.context = null;
      this.finished = false;

      const t = this.task;
      this.stateEl = stateBadge(t.state, "task-state");
      const facts = [
        ["Project", t.project, "task-project"], ["Agent", t.agent, "task-agent"], ["Model", t.model || "default", "task-model"],
        ["Mode", t.mode || "default", "task-mode"], ["Requester", userLabel(t.requester), "task-requester"],
        ["Created", null, "task-created"],
      ];
      this.header = h("div", { class: "task-head" },
        h("p", { class: "task-state-line" }, "State: ", this.stateEl),
        h("dl", { class: "facts" }, facts.map(([k, v, id]) => [h("dt", { text: k }),
          id === "task-created" ? h("dd", { id }, timeEl(t.created_at)) : h("dd", { id, text: v || "—" })])),
        t.follows ? h("p", null, "Follows ", h("a", { href: "#/task/" + encodeURIComponent(t.follows), text: t.follows })) : null,
        h("details", { class: "prompt-box" }, h("summary", { text: "Prompt: " + firstLine(t.prompt, 80) }),
          renderMarkdown(t.prompt || "")));
      this.usage = h("p", { id: "task-usage", class: "usage-line", "aria-live": "off" });
      this.conversation = h("div", { id: "conversation", class: "conversation", "aria-live": "polite", "aria-relevant": "additions" });
      this.liveNote = h("p", { id: "live-status", class: "muted live-status", role: "status" });

      const text = h("textarea", { id: "reply-text", name: "prompt", rows: "3", maxlength: String(PROMPT_MAX), required: true });
      const send = h("button", { type: "submit", id: "reply-send", text: "Send" });
      this.replyForm = h("form", { id: "reply-form", class: "reply" },
        field("Follow-up message", text, "Ctrl+Enter or ⌘+Enter sends."), h("div", { class: "actions" }, send));
      text.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
          e.preventDefault();
          this.replyForm.requestSubmit ? this.replyForm.requestSubmit(send) : send.click();
        }
      });
      this.replyForm.addEventListener("submit", (e) => {
        e.preventDefault();
        const prompt = text.value.trim();
        if (!prompt) return;
        act(send, async () => {
          const next = await api("POST", "/tasks/" + encodeURIComponent(this.id) + "/reply", { prompt });
          text.value = "";
          if (next && next.id && next.id !== this.id) {
            location.hash = "#/task/" + encodeURIComponent(next.id);
          } else if (!live && this.gen === routeGen) {
            this.finished = false;
            this.open = true;
            this.setState("queued");
            this.cancelBtn.hidden = !this.canCancel;
            this.startLive();
          }
        });
      });
      this.cancelBtn = h("button", { type: "button", id: "cancel-task", class: "danger", text: "Cancel task" });
      this.cancelBtn.addEventListener("click", () => {
        if (!confirm("Cancel task " + this.id + "?")) return;
        act(this.cancelBtn, () => api("POST", "/tasks/" + encodeURIComponent(this.id) + "/cancel"));
      });
      this.cancelBtn.hidden = !(this.canCancel && this.open);
      this.controls = h("div", { class: "task-controls" }, this.liveNote, this.replyForm, h("p", null, this.cancelBtn));
      this.renderUsage();
    }

    setState(s) {
      this.task.state = s;
      this.stateEl.textContent = String(s).replace(/_/g, " ");
      this.stateEl.className = "badge state state-" + s;
    }

    renderUsage() {
      const u = this.usageSums;
      const parts = ["in " + tokens(u.input), "out " + tokens(u.output) + " tokens", usd(u.cost)];
      if (this.context) parts.push(contextText(this.context.tokens, this.context.window));
      this.usage.textContent = parts.join(" · ");
    }

    add(node) {
      const atBottom = typeof window !== "undefined" && window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
      this.conversation.appendChild(node);
      // Follow the conversation only when the reader is already at its end, so reading back is not disturbed.
      if (atBottom && this.live && node.scrollIntoView) node.scrollIntoView({ block: "end" });
    }

    status(cls, ...kids) {
      this.add(h("p", { class: "event status-line " + cls }, kids));
    }

    /** One `{seq, event}` from history or the live stream, applied at most once. */
    apply(item) {
      if (!item || typeof item.seq !== "number" || item.seq <= this.lastSeq) return;
      this.lastSeq = item.seq;
      const ev = item.event || {};
      try {
        this.render(ev);
      } catch (e) {
        // One odd event must not stop the rest of the conversation from showing.
        this.status("event-error", "An event could not be shown (" + String(ev.kind) + ").");
      }
    }

    render(ev) {
      switch (ev.kind) {
        case "started":
          if (["queued"].includes(this.task.state)) this.setState("running");
          this.status("started", "Started in ", h("code", { text: ev.cwd || "" }));
          break;
        case "session":
          this.status("session", "Session ", h("code", { text: ev.session_id || "" }),
            ev.model ? " · model " + ev.model : "", ev.claude_version ? " · Claude Code " + ev.claude_version : "");
          break;
        case "text":
          this.add(h("div", { class: "event text" }, renderMarkdown(ev.text)));
          break;
        case "tool":
          this.tool(ev);
          break;
        case "tool_result":
          this.toolResult(ev);
          break;
        case "approval_requested":
          this.approval(ev);
          break;
        case "approval_closed":
          this.approvalClosed(ev);
          break;
        case "turn_finished": {
          const u = this.usageSums;
          u.input += Number(ev.input_tokens) || 0;
          u.output += Number(ev.output_tokens) || 0;
          // Claude Code reports the running total of its process, not the turn's own cost: the latest is the sum.
          if (typeof ev.cost_usd === "number") u.cost = ev.cost_usd;
          this.renderUsage();
          const bits = [ev.is_error ? "Turn failed" : "Turn finished", ev.subtype && ev.subtype !== "success" ? " (" + ev.subtype + ")" : ""];
          if (typeof ev.turns === "number") bits.push(" · " + ev.turns + " turns");
          if (typeof ev.duration_ms === "number") bits.push(" · " + (ev.duration_ms / 1000).toFixed(1) + " s");
          if (typeof ev.cost_usd === "number") bits.push(" · " + usd(ev.cost_usd));
          this.status("turn-finished" + (ev.is_error ? " error" : ""), bits.join(""));
          if (ev.is_error && ev.text) this.add(h("div", { class: "event text error" }, renderMarkdown(ev.text)));
          break;
        }
        case "context":
          this.context = { tokens: Number(ev.tokens) || 0, window: ev.window };
          this.renderUsage();
          break;
        case "worktree": {
          const c = ev.change;
          const box = h("div", { class: "event worktree" },
            h("p", { class: "status-line" }, "Worktree ", h("code", { text: ev.branch || "" }), " from ",
              h("code", { text: String(ev.base || "").slice(0, 12) }),
              c ? " · " + c.files_changed + " files, +" + c.insertions + " −" + c.deletions : ""),
            ev.note ? h("p", { class: "note", text: ev.note }) : null);
          if (ev.diff) box.appendChild(h("details", { class: "worktree-diff" }, h("summary", { text: "Changes" }), renderDiff(ev.diff, ev.diff_cut)));
          this.add(box);
          break;
        }
        case "finished":
          this.finish(ev);
          break;
        default:
          // A kind from a newer relay: nothing to show, and nothing lost.
          break;
      }
    }

    tool(ev) {
      const statusEl = h("span", { class: "tool-status", text: "running" });
      const body = h("div", { class: "tool-body" });
      if (ev.command) body.appendChild(h("pre", { class: "command", tabindex: "0" }, h("code", { text: ev.command })));
      const block = h("details", { class: "event tool", dataset: ev.id ? { toolId: ev.id } : null },
        h("summary", null, h("span", { class: "tool-name", text: ev.name || "tool" }), " ",
          h("span", { class: "tool-summary", text: ev.summary || "" }), " ", statusEl,
          ev.auto_allowed ? h("span", { class: "badge auto", text: "allowed by a session rule" }) : null),
        body);
      block.statusEl = statusEl;
      block.body = body;
      // An auto_allowed event repeats the plain one for the same use: mark the earlier block instead of adding.
      if (ev.auto_allowed && ev.id && this.tools.has(ev.id)) {
        const prev = this.tools.get(ev.id);
        prev.querySelector("summary").appendChild(h("span", { class: "badge auto", text: "allowed by a session rule" }));
        return;
      }
      if (ev.id) this.tools.set(ev.id, block);
      this.openTools.push(block);
      this.add(block);
    }

    toolResult(ev) {
      let block = ev.tool_use_id ? this.tools.get(ev.tool_use_id) : undefined;
      // Without a matching id (older agents send none) the result belongs to the latest tool still open.
      if (!block) block = [...this.openTools].reverse().find((b) => !ev.tool_use_id || !b.dataset.toolId);
      if (!block || block.done) {
        block = h("details", { class: "event tool orphan" },
          h("summary", null, h("span", { class: "tool-name", text: "result" }), " "), h("div", { class: "tool-body" }));
        block.statusEl = h("span", { class: "tool-status" });
        block.querySelector("summary").appendChild(block.statusEl);
        block.body = block.querySelector(".tool-body");
        this.add(block);
      }
      block.done = true;
      this.openTools = this.openTools.filter((b) => b !== block);
      block.classList.add("done");
      if (ev.is_error) block.classList.add("error");
      let statusText = ev.is_error ? "error" : "ok";
      if (typeof ev.exit_code === "number") statusText += " · exit " + ev.exit_code;
      block.statusEl.textContent = statusText;
      block.statusEl.classList.toggle("error", Boolean(ev.is_error));
      const body = block.body;
      if (typeof ev.exit_code === "number") body.appendChild(h("p", { class: "exit-code", text: "Exit code " + ev.exit_code }));
      if (typeof ev.output === "string") {
        body.appendChild(h("pre", { class: "output" + (ev.is_error ? " error" : ""), tabindex: "0" }, h("code", { text: ev.output })));
        if (typeof ev.output_bytes === "number" && ev.output_bytes > byteLen(ev.output)) {
          body.appendChild(h("p", { class: "cut muted", text: "output cut: " + ev.output_bytes + " bytes" }));
        }
      } else if (ev.summary) {
        body.appendChild(h("pre", { class: "output summary" + (ev.is_error ? " error" : ""), tabindex: "0" }, h("code", { text: ev.summary })));
      }
      if (ev.diff) body.appendChild(renderDiff(ev.diff, ev.diff_cut));
      // Errors and diffs are what a reader looks for: show them without a click.
      if (ev.is_error || ev.diff) block.open = true;
    }

    approval(ev) {
      const id = String(ev.approval || "");
      const card = h("section", { class: "event approval open", dataset: { approval: id }, "aria-label": "Approval for " + (ev.tool || "a tool") },
        h("h2", null, "Approval: ", h("span", { class: "approval-tool", text: ev.tool || "" })),
        h("p", { class: "approval-summary", text: ev.summary || "" }),
        h("details", { class: "approval-input", open: true }, h("summary", { text: "Input" }),
          h("pre", { tabindex: "0" }, h("code", { text: JSON.stringify(ev.input, null, 2) || "" }))),
        ev.input_cut ? h("p", { class: "cut warn", text: "The input was too long to show whole; the decision applies to all of it." }) : null,
        ev.description ? h("p", { class: "approval-description" }, h("span", { class: "muted", text: "Claude says: " }), ev.description) : null);
      const outcome = h("p", { class: "outcome", "aria-live": "polite" });
      if (this.canApprove && this.open && !this.finished) {
        const questions = ev.question ? questionsOf(ev.input) : [];
        if (ev.question && !questions.length) {
          card.appendChild(h("p", { class: "note", text: "Claude asks a question this page cannot show: answer it in Discord, or deny it here." }));
        }
        const reason = h("input", { type: "text", class: "deny-reason", maxlength: "1000", autocomplete: "off" });
        const once = h("button", { type: "button", class: "allow-once", text: "Allow once", hidden: ev.question });
        const session = h("button", { type: "button", class: "allow-session", text: "Allow for this task", hidden: ev.question,
          title: ev.session ? scopeText(ev.session) : null });
        const deny = h("button", { type: "button", class: "deny danger", text: "Deny" });
        const decide = (btn, decision) => act(btn, async () => {
          const body = { decision };
          if (decision === "deny" && reason.value.trim()) body.reason = reason.value.trim();
          await api("POST", "/tasks/" + encodeURIComponent(this.id) + "/approvals/" + encodeURIComponent(id), body);
          outcome.textContent = "Answer sent: " + decision.replace(/_/g, " ") + ".";
          for (const b of controls.querySelectorAll("button, input")) b.disabled = true;
        });
        once.addEventListener("click", () => decide(once, "allow_once"));
        session.addEventListener("click", () => decide(session, "allow_session"));
        deny.addEventListener("click", () => decide(deny, "deny"));
        reason.addEventListener("keydown", (e) => {
          if (e.key === "Enter") {
            e.preventDefault();
            decide(deny, "deny");
          }
        });
        // AskUserQuestion: one group of choices per question, sent together as {question: answer}.
        const groups = questions.map((q, i) => {
          const name = "q-" + id + "-" + i;
          const inputs = q.options.map((label) => h("input", { type: q.multi ? "checkbox" : "radio", name, value: label }));
          return { q, inputs, el: h("fieldset", { class: "question" }, h("legend", { text: q.text }),
            q.options.map((label, k) => h("label", { class: "choice" }, inputs[k], " " + label))) };
        });
        const send = h("button", { type: "button", class: "send-answers", text: "Send answers", hidden: !questions.length });
        send.addEventListener("click", () => {
          const answers = {};
          for (const g of groups) {
            const picked = g.inputs.filter((x) => x.checked).map((x) => x.value);
            if (!picked.length) return showError(new Error("Answer every question first: " + g.q.text));
            answers[g.q.text] = picked.join(", ");
          }
          act(send, async () => {
            await api("POST", "/tasks/" + encodeURIComponent(this.id) + "/approvals/" + encodeURIComponent(id),
              { decision: "answers", answers });
            outcome.textContent = "Answers sent.";
            for (const b of controls.querySelectorAll("button, input")) b.disabled = true;
          });
        });
        const controls = h("div", { class: "approval-actions" },
          groups.map((g) => g.el),
          h("div", { class: "buttons" }, once, session, send),
          ev.session ? h("p", { class: "hint muted", text: "“Allow for this task” allows: " + scopeText(ev.session) }) : null,
          h("div", { class: "deny-row" }, field("Reason (optional)", reason), deny));
        card.controls = controls;
        card.appendChild(controls);
      } else if (this.approver) {
        card.appendChild(h("p", { class: "note muted waiting", text: "Waiting for " + userLabel(this.approver) + " to answer." }));
      }
      card.appendChild(outcome);
      card.outcome = outcome;
      this.approvals.set(id, card);
      if (!this.finished) this.setState("waiting_approval");
      this.add(card);
    }

    approvalClosed(ev) {
      const card = this.approvals.get(String(ev.approval || ""));
      if (!card) {
        this.status("approval-closed", "Approval " + ev.approval + ": " + ev.outcome);
        return;
      }
      this.closeCard(card, String(ev.outcome || "closed"));
      if (!this.finished && ![...this.approvals.values()].some((c) => c.classList.contains("open"))) this.setState("running");
    }

    closeCard(card, outcome) {
      if (card.controls) card.controls.remove();
      const waiting = card.querySelector(".waiting");
      if (waiting) waiting.remove();
      card.controls = null;
      card.classList.remove("open");
      card.classList.add("closed");
      card.outcome.textContent = "Outcome: " + outcome;
    }

    finish(ev) {
      this.finished = true;
      this.open = false;
      this.setState(ev.state || "done");
      for (const card of this.approvals.values()) if (card.classList.contains("open")) this.closeCard(card, "task ended");
      for (const b of this.openTools) b.statusEl.textContent = "no result";
      this.openTools = [];
      this.cancelBtn.hidden = true;
      this.status("finished state-" + (ev.state || "done"), "Finished: " + (ev.state || "done"), ev.message ? " — " + ev.message : "");
      this.stopLive("The task has ended. A follow-up message starts a new task that carries on.");
    }

    startLive() {
      if (this.finished || !this.open || this.gen !== routeGen || typeof EventSource === "undefined") {
        if (!this.open && !this.finished) this.liveNote.textContent = "This task is not running.";
        return;
      }
      closeLive();
      const es = new EventSource(API + "/tasks/" + encodeURIComponent(this.id) + "/live?after=" + this.lastSeq);
      live = es;
      this.live = true;
      this.liveNote.textContent = "Connecting…";
      es.addEventListener("open", () => {
        if (live === es) this.liveNote.textContent = "Live.";
      });
      const onEvent = (msg) => {
        if (live !== es) return;
        let item;
        try {
          item = JSON.parse(msg.data);
        } catch (e) {
          return;
        }
        this.apply(item);
      };
      // The contract names these "task"; unnamed ones are read too, and seq numbers keep either from repeating.
      es.addEventListener("task", onEvent);
      es.addEventListener("message", onEvent);
      es.addEventListener("error", () => {
        if (live !== es) return;
        if (es.readyState === EventSource.CLOSED) {
          // The relay refused (signed out, too many streams) or the stream ended: offer a manual retry.
          this.stopLive("The live view stopped.");
          const retry = h("button", { type: "button", id: "live-retry", class: "link", text: "Reconnect" });
          retry.addEventListener("click", () => {
            retry.remove();
            act(null, async () => {
              await api("GET", "/me"); // a 401 here shows the signed-out view
              this.startLive();
            });
          });
          this.liveNote.append(" ", retry);
        } else {
          this.liveNote.textContent = "Reconnecting…";
        }
      });
    }

    stopLive(note) {
      if (live && this.live) closeLive();
      this.live = false;
      this.liveNote.textContent = note || "";
    }
  }

  function scopeText(s) {
    if (!s || typeof s !== "object") return "";
    switch (s.kind) {
      case "command": return "exactly the command " + s.command;
      case "prefix": return "commands starting with " + s.prefix;
      case "file": return "edits to " + s.path;
      case "origin": return "fetches from " + s.origin;
      case "input": return s.tool + " with exactly this input";
      default: return "this kind of request";
    }
  }

  // New task --------------------------------------------------------------------------------------------------

  async function newTaskView() {
    const projects = (await api("GET", "/projects")) || [];
    const prompt = h("textarea", { id: "new-prompt", name: "prompt", rows: "6", maxlength: String(PROMPT_MAX), required: true });
    const project = h("select", { id: "new-project", name: "project", required: true },
      projects.map((p, n) => h("option", { value: String(n),
        text: p.name + " — " + p.agent + " (" + (p.owner === state.user ? "you" : p.owner) + ")" })));
    const model = h("input", { type: "text", id: "new-model", name: "model", autocomplete: "off", placeholder: "default" });
    const mode = h("select", { id: "new-mode", name: "mode" }, MODES.map((m) => h("option", { value: m, text: m })));
    const submit = h("button", { type: "submit", id: "new-submit", text: "Start task" });
    const form = h("form", { class: "new-task" },
      field("Prompt", prompt), field("Project", project), field("Model (optional)", model), field("Permission mode", mode),
      h("div", { class: "actions" }, submit));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const p = projects[Number(project.value)];
      if (!prompt.value.trim()) return showError(new Error("Write a prompt first."));
      if (!p) return showError(new Error("Choose a project."));
      const body = { prompt: prompt.value, project: p.name, agent: p.agent, mode: mode.value };
      if (p.owner !== state.user) body.target = p.owner;
      if (model.value.trim()) body.model = model.value.trim();
      act(submit, async () => {
        const t = await api("POST", "/tasks", body);
        if (t && t.id) location.hash = "#/task/" + encodeURIComponent(t.id);
      });
    });
    if (!projects.length) {
      submit.disabled = true;
      return view("new-task", "New task", h("p", { class: "muted", text: "No projects you can run tasks in yet. Add one in Discord with /project add, or ask someone to share theirs." }), form);
    }
    return view("new-task", "New task", form);
  }

  // Shares ----------------------------------------------------------------------------------------------------

  async function sharesView(r, gen) {
    const shares = (await api("GET", "/shares")) || [];
    const rows = shares.map((s) => {
      const mine = s.owner === state.user;
      let remove = null;
      if (mine) {
        remove = h("button", { type: "button", class: "remove-share danger", text: "Remove", "aria-label": "Remove share with " + s.grantee });
        remove.addEventListener("click", () => act(remove, async () => {
          await api("DELETE", "/shares/" + encodeURIComponent(s.grantee));
          route(true); // the button is gone: put keyboard focus back at the top of the view
        }));
      }
      return h("tr", { class: "share", dataset: { owner: s.owner, grantee: s.grantee } },
        h("td", { text: mine ? "you → " + s.grantee : s.owner + " → you" }),
        h("td", { text: (s.projects || []).join(", ") || "—" }),
        h("td", { text: s.level }),
        h("td", null, remove));
    });
    const grantee = h("input", { type: "text", id: "share-grantee", name: "grantee", inputmode: "numeric", required: true,
      autocomplete: "off", pattern: "[0-9]{1,25}", title: "A Discord user id: digits only" });
    const projects = h("input", { type: "text", id: "share-projects", name: "projects", required: true, autocomplete: "off" });
    const level = h("select", { id: "share-level", name: "level" }, h("option", { value: "run", text: "run" }), h("option", { value: "trusted", text: "trusted" }));
    const add = h("button", { type: "submit", id: "share-submit", text: "Share" });
    const form = h("form", { class: "share-form", id: "share-form" },
      h("h2", { text: "Share projects" }),
      field("Discord user id", grantee), field("Projects (comma-separated)", projects), field("Level", level,
        "run: they may run tasks; trusted: they may also approve."),
      h("div", { class: "actions" }, add));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const list = projects.value.split(",").map((p) => p.trim()).filter(Boolean);
      act(add, async () => {
        await api("POST", "/shares", { grantee: grantee.value.trim(), projects: list, level: level.value });
        route(true);
      });
    });
    return view("shares", "Shares",
      shares.length ? table(["Who", "Projects", "Level", ""], rows, "shares") : h("p", { class: "muted", text: "No shares either way." }),
      form);
  }

  // Audit, usage ----------------------------------------------------------------------------------------------

  async function auditView() {
    const entries = (await api("GET", "/audit")) || [];
    const rows = entries.map((e) => h("tr", { class: "audit-entry" },
      h("td", null, timeEl(e.at)), h("td", { text: userLabel(e.actor) }), h("td", { class: "what", text: e.what })));
    return view("audit", "Audit log", rows.length ? table(["When", "Who", "What"], rows, "audit") : h("p", { class: "muted", text: "Nothing recorded yet." }));
  }

  async function usageView() {
    const u = (await api("GET", "/usage")) || { days: [], total: {} };
    const cells = (d) => [h("td", { class: "num", text: String(d.tasks || 0) }), h("td", { class: "num", text: tokens(d.input_tokens) }),
      h("td", { class: "num", text: tokens(d.output_tokens) }), h("td", { class: "num", text: usd(d.cost_usd) })];
    const rows = (u.days || []).map((d) => h("tr", { class: "usage-day", dataset: { day: d.day } }, h("th", { scope: "row", text: d.day }), cells(d)));
    const t = h("div", { class: "table-wrap" }, h("table", { class: "usage" },
      h("thead", null, h("tr", null, ["Day", "Tasks", "Input tokens", "Output tokens", "Cost"].map((x) => h("th", { scope: "col", text: x })))),
      h("tbody", null, rows),
      h("tfoot", null, h("tr", { id: "usage-total" }, h("th", { scope: "row", text: "Total" }), cells(u.total || {})))));
    return view("usage", "Usage (last 30 days)", t);
  }

  // Sessions --------------------------------------------------------------------------------------------------

  async function sessionsView() {
    const sessions = (await api("GET", "/sessions")) || [];
    const list = h("ul", { class: "cards sessions-list" });
    for (const s of sessions) {
      const end = h("button", { type: "button", class: "end-session danger", text: "End", "aria-label": "End session " + (s.client || s.id) });
      end.addEventListener("click", () => act(end, async () => {
        await api("DELETE", "/sessions/" + encodeURIComponent(s.id));
        if (s.current || s.id === state.session) showSignedOut();
        else route(true);
      }));
      list.appendChild(h("li", { class: "card session" + (s.current ? " current" : ""), dataset: { id: s.id } },
        h("h2", null, h("span", { class: "client", text: s.client || "Unknown browser" }),
          s.current ? h("span", { class: "badge this-session", text: "this session" }) : null),
        h("dl", { class: "facts" },
          h("dt", { text: "Signed in" }), h("dd", null, timeEl(s.created_at)),
          h("dt", { text: "Last seen" }), h("dd", null, timeEl(s.last_seen)),
          h("dt", { text: "Expires" }), h("dd", null, timeEl(s.expires_at))),
        end));
    }
    const endAll = h("button", { type: "button", id: "end-all", class: "danger", text: "End all sessions" });
    endAll.addEventListener("click", () => {
      if (!confirm("End every session, this one included?")) return;
      act(endAll, async () => {
        await api("DELETE", "/sessions");
        showSignedOut();
      });
    });
    return view("sessions", "Sessions", list, h("p", null, endAll));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Start

  async function start() {
    const signOut = document.getElementById("sign-out");
    if (signOut) {
      signOut.addEventListener("click", () => act(signOut, async () => {
        await api("POST", "/signout");
        showSignedOut();
      }));
    }
    const alertClose = document.getElementById("alert-close");
    if (alertClose) alertClose.addEventListener("click", clearError);
    let me;
    try {
      me = await api("GET", "/me");
    } catch (e) {
      if (e.status !== 401) {
        clear(main());
        showError(e);
      }
      return;
    }
    state.user = String(me.user);
    state.csrf = me.csrf;
    state.session = me.session;
    const user = document.getElementById("me-user");
    if (user) user.textContent = state.user;
    const top = document.getElementById("top");
    if (top) top.hidden = false;
    setInterval(refreshTimes, 30000);
    window.addEventListener("hashchange", () => {
      // In-page anchors (the skip link) are not routes.
      if (location.hash === "" || location.hash.startsWith("#/")) route(true);
    });
    route(false);
  }

  // Exposed for tests of the pure parts; the page itself needs nothing global.
  const testing = { renderMarkdown, renderDiff, highlightLine, inline, langFor, relTime, tokens, contextText, parseRoute, safeUrl,
    TaskPage };
  if (typeof globalThis !== "undefined") globalThis.CTDashboard = testing;

  if (typeof document !== "undefined" && typeof location !== "undefined" && document.getElementById && document.getElementById("main")) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
  }
})();
