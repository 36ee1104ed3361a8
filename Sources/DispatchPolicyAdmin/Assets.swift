/// The admin's stylesheet and script, served by the binary itself.
enum Assets {
    static let css = """
        :root { color-scheme: light dark; --bg: #fff; --fg: #1b1f24; --muted: #5b6570; --line: #d8dee4; --accent: #0b66c3;
          --done: #8fb8e8; --failed: #e58a8a; --lag: #c2410c; --warn-bg: #fff4d6; --warn-fg: #5c4400; --row: #f6f8fa; }
        :root[data-theme="dark"] { --bg: #0f1419; --fg: #e6edf3; --muted: #9aa6b2; --line: #2d3640; --accent: #58a6ff;
          --done: #2f5f93; --failed: #8f3a3a; --lag: #f0883e; --warn-bg: #3a2f0b; --warn-fg: #f5d98b; --row: #161b22; }
        @media (prefers-color-scheme: dark) { :root[data-theme="auto"] { --bg: #0f1419; --fg: #e6edf3; --muted: #9aa6b2; --line: #2d3640;
          --accent: #58a6ff; --done: #2f5f93; --failed: #8f3a3a; --lag: #f0883e; --warn-bg: #3a2f0b; --warn-fg: #f5d98b; --row: #161b22; } }
        * { box-sizing: border-box; }
        body { margin: 0; background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
        header { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; padding: .6rem 1rem; border-bottom: 1px solid var(--line); }
        header nav a { margin-right: .8rem; }
        header form { display: inline; margin: 0; }
        .brand { font-weight: 600; color: var(--fg); text-decoration: none; }
        a { color: var(--accent); }
        main { padding: 1rem; max-width: 1400px; }
        footer { padding: 1rem; color: var(--muted); font-size: 12px; }
        h1 { font-size: 1.4rem; margin: .2rem 0 1rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
        table.grid { border-collapse: collapse; width: 100%; }
        .grid th, .grid td { border-bottom: 1px solid var(--line); padding: .3rem .5rem; text-align: left; vertical-align: top; }
        .grid th { color: var(--muted); font-weight: 500; white-space: nowrap; }
        .grid tbody tr:hover { background: var(--row); }
        .n { text-align: right !important; font-variant-numeric: tabular-nums; white-space: nowrap; }
        .key { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
        .state { border-radius: 3px; padding: 0 .35rem; font-size: 12px; border: 1px solid var(--line); }
        .state.paused, .state.failing { background: var(--warn-bg); color: var(--warn-fg); }
        .state.shadow { border-style: dashed; color: var(--muted); }
        ul.hints, tr.hints ul { margin: .2rem 0; padding-left: 1.2rem; color: var(--warn-fg); background: var(--warn-bg); border-radius: 4px; }
        tr.hints td { border-bottom: none; padding-top: 0; }
        .flash { padding: .5rem .8rem; border-radius: 4px; background: var(--row); border: 1px solid var(--line); }
        .flash.error { background: var(--warn-bg); color: var(--warn-fg); }
        .actions { display: flex; gap: .5rem; margin: .5rem 0; } .actions form, .row-actions form { display: inline; }
        .chart path.pending { fill: none; stroke: var(--fg); stroke-width: 1.2; opacity: .75; }
        .admit-now input[type=number] { width: 5em; }
        button { font: inherit; padding: .15rem .6rem; border: 1px solid var(--line); border-radius: 4px; background: var(--row); color: var(--fg); cursor: pointer; }
        button.danger { border-color: var(--failed); }
        button.watch { border: none; background: none; font-size: 16px; padding: 0 .2rem; }
        button.watch.on { color: #d29922; }
        .filters { display: flex; gap: .8rem; align-items: center; margin-bottom: .5rem; }
        input, select { font: inherit; background: var(--bg); color: var(--fg); border: 1px solid var(--line); border-radius: 4px; padding: .1rem .3rem; }
        pre { white-space: pre-wrap; word-break: break-word; background: var(--row); padding: .5rem; border-radius: 4px; margin: 0; }
        .empty, .note, .legend { color: var(--muted); }
        .swatch { display: inline-block; width: .8rem; height: .8rem; vertical-align: middle; }
        .swatch.done { background: var(--done); } .swatch.failed { background: var(--failed); } .swatch.lag { background: var(--lag); height: .2rem; }
        svg.chart rect.done { fill: var(--done); } svg.chart rect.failed { fill: var(--failed); } svg.chart rect.hit { fill: transparent; }
        svg.chart g:hover rect.hit { fill: var(--row); }
        svg.chart path.lag { fill: none; stroke: var(--lag); stroke-width: 1.5; }
        svg.chart text.axis { fill: var(--muted); font-size: 10px; } svg.chart text.lag-axis { fill: var(--lag); }
        dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; } dl.facts dt { color: var(--muted); }
        ol.timeline { padding-left: 1.2rem; } tr.waits td:first-child { color: var(--lag); font-weight: 600; }
        """

    /// Theme, auto-refresh (keeping the scroll position), the watched
    /// partitions (kept in localStorage and in the address), and a
    /// confirmation before destructive actions. No inline script: the
    /// Content-Security-Policy allows scripts from this origin only.
    static let js = """
        (function () {
          "use strict";
          var root = document.documentElement;
          function stored(key, fallback) { try { return localStorage.getItem(key) || fallback; } catch (e) { return fallback; } }
          function store(key, value) { try { localStorage.setItem(key, value); } catch (e) {} }
          root.dataset.theme = stored("dp-theme", "auto");
          document.addEventListener("DOMContentLoaded", function () {
            var theme = document.getElementById("theme");
            if (theme) {
              theme.value = root.dataset.theme;
              theme.addEventListener("change", function () { root.dataset.theme = theme.value; store("dp-theme", theme.value); });
            }
            // Auto-refresh: off unless chosen; the scroll position survives the reload.
            var refresh = document.getElementById("refresh");
            var saved = sessionStorage.getItem("dp-scroll:" + location.pathname + location.search);
            if (saved !== null) { window.scrollTo(0, parseInt(saved, 10) || 0); }
            var timer = null;
            function schedule() {
              if (timer) { clearTimeout(timer); timer = null; }
              var seconds = parseInt(refresh ? refresh.value : "0", 10);
              if (seconds > 0) {
                timer = setTimeout(function () {
                  sessionStorage.setItem("dp-scroll:" + location.pathname + location.search, String(window.scrollY));
                  location.reload();
                }, seconds * 1000);
              }
            }
            if (refresh) {
              refresh.value = stored("dp-refresh", "0");
              refresh.addEventListener("change", function () { store("dp-refresh", refresh.value); schedule(); });
              schedule();
            }
            // Watched partitions, per policy page: the address wins; else what this browser kept.
            var match = location.pathname.match(/^\\/policies\\/(.+)$/);
            if (match) {
              var key = "dp-watch:" + match[1];
              var params = new URLSearchParams(location.search);
              var fromUrl = params.getAll("watch");
              var watched;
              if (fromUrl.length > 0) {
                watched = fromUrl;
                store(key, JSON.stringify(watched));
              } else {
                try { watched = JSON.parse(stored(key, "[]")); } catch (e) { watched = []; }
                if (!Array.isArray(watched)) { watched = []; }
                if (watched.length > 0 && !params.has("nowatch")) {
                  watched.forEach(function (p) { params.append("watch", p); });
                  location.replace(location.pathname + "?" + params.toString());
                  return;
                }
              }
              document.querySelectorAll("button.watch").forEach(function (button) {
                var partition = button.getAttribute("data-partition");
                if (watched.indexOf(partition) >= 0) { button.classList.add("on"); button.textContent = "★"; }
                button.addEventListener("click", function () {
                  var index = watched.indexOf(partition);
                  if (index >= 0) { watched.splice(index, 1); } else { watched.push(partition); }
                  store(key, JSON.stringify(watched));
                  var next = new URLSearchParams(location.search);
                  next.delete("watch");
                  watched.forEach(function (p) { next.append("watch", p); });
                  if (watched.length === 0) { next.set("nowatch", "1"); } else { next.delete("nowatch"); }
                  location.assign(location.pathname + "?" + next.toString());
                });
              });
            }
            document.querySelectorAll("form.confirm").forEach(function (form) {
              form.addEventListener("submit", function (event) {
                if (!window.confirm(form.getAttribute("data-confirm") || "Are you sure?")) { event.preventDefault(); }
              });
            });
          });
        })();
        """
}
