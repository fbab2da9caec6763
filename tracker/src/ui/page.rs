//! The HTML of the usage page and its login form. Everything that comes from a client
//! (user, model, path, deny reason, the query's own values) goes through [`esc`] where
//! it is written, in text and in attributes alike. Numbers carry stable `id`s and
//! `data-*` attributes with the exact value, for tests and scrapers; the text shows them
//! grouped by thousands.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{buckets, tokens, Data, View, PRESETS, TOP_USERS};
use crate::ledger::Totals;
use crate::time::{self, HOUR_MS};

/// `s` safe in HTML text and in quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` as `1,234,567`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1234567` as `1.2M`, for axes.
fn short(n: u64) -> String {
    let (value, suffix) = match n {
        0..1_000 => return n.to_string(),
        1_000..1_000_000 => (n as f64 / 1e3, "k"),
        1_000_000..1_000_000_000 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "G"),
    };
    let digits = format!("{value:.3}");
    format!("{}{suffix}", digits.trim_end_matches('0').trim_end_matches('.'))
}

/// `2025-11-22 08:00` (UTC) of a time in ms.
fn minute(ms: i64) -> String {
    let t = time::format_rfc3339(ms);
    format!("{} {}", t.get(..10).unwrap_or(""), t.get(11..16).unwrap_or(""))
}

const STYLE: &str = r#"
:root{--bg:#f6f7f9;--fg:#1d2330;--muted:#5d6675;--card:#fff;--line:#dde1e7;--accent:#2f6fde;
--prompt:#4e79a7;--completion:#f28e2b;--cached:#59a14f;--reasoning:#b07aa1;--denied:#e15759;--requests:#76b7b2}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--fg:#e4e7ec;--muted:#9aa3b2;--card:#1d2129;--line:#343a46;--accent:#6ea2ff}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;align-items:center;justify-content:space-between;gap:1rem;padding:.7rem 1.2rem;background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:1.15rem;margin:0}h2{font-size:1rem;margin:0 0 .6rem}
main{max-width:1200px;margin:0 auto;padding:1rem 1.2rem 2rem}
section,.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:1rem;margin:0 0 1rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:1rem}.grid>.panel{margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(9.5rem,1fr));gap:.8rem;background:none;border:0;padding:0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.7rem .9rem}
.card .label{display:block;color:var(--muted);font-size:.85rem}.card .num{font-size:1.45rem;font-weight:600;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:.7rem;height:.7rem;border-radius:2px;margin-right:.35rem;vertical-align:baseline}
form.period{display:flex;flex-wrap:wrap;gap:.6rem;align-items:end}
form.period label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted)}
input{font:inherit;padding:.35rem .5rem;border:1px solid var(--line);border-radius:6px;background:var(--bg);color:var(--fg);min-width:0}
button{font:inherit;padding:.4rem .9rem;border:1px solid var(--accent);border-radius:6px;background:var(--accent);color:#fff;cursor:pointer}
button.quiet{background:none;color:var(--accent)}
.presets{display:flex;gap:.3rem}.presets a{padding:.35rem .7rem;border:1px solid var(--line);border-radius:6px;text-decoration:none;color:var(--fg)}
.presets a.on{background:var(--accent);border-color:var(--accent);color:#fff}
.muted{color:var(--muted)}.error{color:var(--denied);font-weight:600}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.35rem .5rem;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}td.name{max-width:18rem;overflow:hidden;text-overflow:ellipsis}
th{color:var(--muted);font-weight:500;font-size:.85rem}
.bar{height:.45rem;border-radius:3px;background:var(--prompt);min-width:1px}
a{color:var(--accent)}
svg.chart{width:100%;height:auto;display:block;min-width:620px}
.split{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,1fr);gap:1rem;align-items:start;margin:0 0 1rem}.split .panel{margin:0 0 1rem}.split>.panel{margin:0}svg text{fill:var(--muted);font-size:12px}
svg .grid{stroke:var(--line)}svg .prompt{fill:var(--prompt)}svg .completion{fill:var(--completion)}
svg .cached{fill:var(--cached)}svg .reasoning{fill:var(--reasoning)}svg .requests{fill:var(--requests)}
.login{max-width:24rem;margin:12vh auto;padding:1.5rem}.login input{width:100%;margin:.4rem 0 .9rem}
@media (max-width:900px){.split{grid-template-columns:1fr}}
@media (max-width:600px){main{padding:.6rem}header{padding:.6rem}.grid{grid-template-columns:1fr}.card .num{font-size:1.2rem}}
"#;

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{}</title><style>{STYLE}</style></head>",
        esc(title)
    )
}

/// The login form, with `message` after a failed attempt.
pub fn login(message: Option<&str>) -> String {
    let message = message.map_or(String::new(), |m| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(m)));
    format!(
        "{}<body><main><section class=\"login\" id=\"login\"><h1>Tollgate usage</h1>\
         <p class=\"muted\">Log in with the tracker's usage API token (<code>TRACKER_API_TOKEN</code>).</p>{message}\
         <form method=\"post\" action=\"/ui/login\"><label for=\"token\">Token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\" id=\"login-submit\">Log in</button></form></section></main></body></html>",
        head("Tollgate usage: log in")
    )
}

/// A link to the page with this period and user.
fn link(view: &View, user: Option<&str>, preset: Option<&str>) -> String {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    match preset.or(view.preset) {
        Some(p) if preset.is_some() || (view.since_text.is_empty() && view.until_text.is_empty()) => {
            pairs.push(("range", p))
        }
        _ => {
            pairs.extend([("since", view.since_text.as_str()), ("until", view.until_text.as_str())]);
            pairs.retain(|(_, v)| !v.is_empty());
        }
    }
    if let Some(user) = user {
        pairs.push(("user", user));
    }
    format!("/ui?{}", serde_urlencoded::to_string(&pairs).unwrap_or_default())
}

/// The usage page for `view`, with `error` (a bad query, an unreadable ledger) on top.
pub fn usage(view: &View, data: &Data, error: Option<&str>) -> String {
    let mut h = head("Tollgate usage");
    let period = format!("{} to {} UTC", minute(view.since_ms), minute(view.until_ms));
    let _ = write!(
        h,
        "<body><header><h1>Tollgate usage</h1><form method=\"post\" action=\"/ui/logout\">\
         <button class=\"quiet\" type=\"submit\" id=\"logout\">Log out</button></form></header>\
         <main id=\"usage\" data-since=\"{}\" data-until=\"{}\"{}>",
        time::format_rfc3339(view.since_ms),
        time::format_rfc3339(view.until_ms),
        view.user.as_deref().map_or(String::new(), |u| format!(" data-user=\"{}\"", esc(u)))
    );
    period_form(&mut h, view, data);
    if let Some(error) = error {
        let _ = write!(h, "<p class=\"error\" id=\"page-error\">{}</p>", esc(error));
    }
    let scope = match &view.user {
        Some(user) => {
            format!("user <strong>{}</strong> · <a href=\"{}\">all users</a>", esc(user), esc(&link(view, None, None)))
        }
        None => "all users".to_owned(),
    };
    let _ = write!(h, "<p class=\"muted\">{period} · {scope}</p>");
    cards(&mut h, &data.total, data.denials.iter().map(|(_, t)| t.requests).sum());

    let unit = if view.width_ms == HOUR_MS { "hour" } else { "day" };
    let series = fill(view, data);
    let _ = write!(h, "<section><h2>Tokens per {unit}</h2>");
    legend(&mut h, &[("prompt", "Prompt"), ("completion", "Completion")]);
    chart(&mut h, view, &series, TOKENS_CHART, &["prompt", "completion"], |t| [t.prompt, t.completion].to_vec());
    h.push_str("</section><div class=\"split\">");
    users(&mut h, view, data);
    h.push_str("<div>");
    by_type(&mut h, &data.total);
    denials(&mut h, data);
    h.push_str("</div></div>");
    models(&mut h, data);
    let _ = write!(h, "<section><h2>Requests per {unit}</h2>");
    chart(&mut h, view, &series, REQUESTS_CHART, &["requests"], |t| vec![t.requests]);
    h.push_str("</section>");
    recent(&mut h, view, data);
    let _ = write!(
        h,
        "<p class=\"muted\">Times in UTC. Cached tokens are part of the prompt tokens. Generated {}.</p>\
         <span id=\"ready\" data-ready=\"true\"></span></main></body></html>",
        minute(time::now_ms())
    );
    h
}

fn period_form(h: &mut String, view: &View, data: &Data) {
    h.push_str("<section><form class=\"period\" method=\"get\" action=\"/ui\"><div class=\"presets\">");
    for (name, _) in PRESETS {
        let on = if view.preset == Some(name) { " class=\"on\"" } else { "" };
        let _ = write!(h, "<a{on} href=\"{}\">{name}</a>", esc(&link(view, view.user.as_deref(), Some(name))));
    }
    let _ = write!(
        h,
        "</div><label>Since (UTC)<input name=\"since\" value=\"{}\" placeholder=\"YYYY-MM-DD\" size=\"14\"></label>\
         <label>Until (UTC)<input name=\"until\" value=\"{}\" placeholder=\"now\" size=\"14\"></label>\
         <label>User<input name=\"user\" list=\"users\" value=\"{}\" placeholder=\"all\" size=\"14\"></label>\
         <datalist id=\"users\">",
        esc(&view.since_text),
        esc(&view.until_text),
        esc(view.user.as_deref().unwrap_or(""))
    );
    for (user, _) in data.users.iter().take(200) {
        let _ = write!(h, "<option value=\"{}\">", esc(user));
    }
    h.push_str("</datalist><button type=\"submit\">Show</button></form></section>");
}

fn cards(h: &mut String, total: &Totals, denied: u64) {
    h.push_str("<section class=\"cards\">");
    for (id, label, value) in [
        ("total-requests", "Requests", total.requests),
        ("total-tokens", "Tokens", tokens(total)),
        ("total-prompt", "Prompt tokens", total.prompt),
        ("total-completion", "Completion tokens", total.completion),
        ("total-cached", "Cached tokens", total.cached),
        ("total-denied", "Denied requests", denied),
    ] {
        let _ = write!(
            h,
            "<div class=\"card\"><span class=\"label\">{label}</span>\
             <span class=\"num\" id=\"{id}\" data-value=\"{value}\">{}</span></div>",
            grouped(value)
        );
    }
    h.push_str("</section>");
}

fn legend(h: &mut String, items: &[(&str, &str)]) {
    h.push_str("<p class=\"muted\">");
    for (class, label) in items {
        let _ = write!(h, "<span class=\"swatch\" style=\"background:var(--{class})\"></span>{label} &nbsp;");
    }
    h.push_str("</p>");
}

/// Every bucket of the period (empty ones as zero), plus any compacted day the
/// ledger put before the first (see `Ledger::usage`).
fn fill(view: &View, data: &Data) -> Vec<(i64, Totals)> {
    let first = time::floor(view.since_ms, view.width_ms);
    let mut all: BTreeMap<i64, Totals> = (0..buckets(view.since_ms, view.until_ms, view.width_ms))
        .map(|i| (first + i * view.width_ms, Totals::default()))
        .collect();
    for bucket in &data.chart {
        all.entry(bucket.start_ms).or_default().add(&bucket.totals);
    }
    all.into_iter().collect()
}

/// The size of a chart's drawing (its `viewBox`; it is as wide as the page).
struct Size(f64, f64);
const TOKENS_CHART: Size = Size(960.0, 170.0);
const REQUESTS_CHART: Size = Size(960.0, 130.0);

/// A bar chart of `series` (stacked, bottom first; `classes` name their colours) per
/// bucket, in a box that scrolls sideways where the screen is too narrow to read it.
fn chart(
    h: &mut String,
    view: &View,
    buckets: &[(i64, Totals)],
    size: Size,
    classes: &[&str],
    values: impl Fn(&Totals) -> Vec<u64>,
) {
    const LEFT: f64 = 52.0;
    const BOTTOM: f64 = 22.0;
    const TOP: f64 = 8.0;
    let Size(width, height) = size;
    let plot_w = width - LEFT - 6.0;
    let plot_h = height - BOTTOM - TOP;
    let max = buckets.iter().map(|(_, t)| values(t).iter().sum::<u64>()).max().unwrap_or(0);
    let top = nice(max);
    let _ = write!(h, "<div class=\"scroll\"><svg class=\"chart\" viewBox=\"0 0 {width} {height}\" role=\"img\">");
    for i in 0..=4u32 {
        let value = top / 4 * u64::from(i);
        let y = TOP + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{width}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            short(value)
        );
    }
    let n = buckets.len().max(1) as f64;
    let slot = plot_w / n;
    let bar = (slot * 0.8).max(1.0);
    let label_every = (buckets.len() / 8).max(1);
    for (i, (start, totals)) in buckets.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let vals = values(totals);
        let mut y = TOP + plot_h;
        let title: Vec<String> = classes.iter().zip(&vals).map(|(c, v)| format!("{c} {}", grouped(*v))).collect();
        let _ = write!(h, "<g><title>{} UTC: {}</title>", minute(*start), title.join(", "));
        for (class, value) in classes.iter().zip(&vals) {
            let bar_h = if top == 0 { 0.0 } else { plot_h * *value as f64 / top as f64 };
            y -= bar_h;
            if bar_h > 0.0 {
                let _ = write!(
                    h,
                    "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{bar_h:.1}\"/>"
                );
            }
        }
        h.push_str("</g>");
        if i.is_multiple_of(label_every) {
            let t = time::format_rfc3339(*start);
            let label = if view.width_ms == HOUR_MS { t.get(11..16) } else { t.get(5..10) }.unwrap_or("");
            let _ = write!(
                h,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                x + bar / 2.0,
                height - 6.0
            );
        }
    }
    h.push_str("</svg></div>");
}

/// The smallest 1, 2 or 5 × 10^k at or above `max`, and divisible into 4 even steps.
fn nice(max: u64) -> u64 {
    if max == 0 {
        return 4;
    }
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            let top = step.saturating_mul(m).saturating_mul(4);
            if top >= max || top == u64::MAX {
                return top;
            }
        }
        step = step.saturating_mul(10);
    }
}

fn by_type(h: &mut String, total: &Totals) {
    h.push_str("<div class=\"panel\"><h2>Tokens by type</h2><table id=\"by-type\"><tr><th>type</th><th>tokens</th><th></th></tr>");
    let max = total.prompt.max(total.completion).max(total.cached).max(total.reasoning).max(1);
    for (class, value) in [
        ("prompt", total.prompt),
        ("completion", total.completion),
        ("cached", total.cached),
        ("reasoning", total.reasoning),
    ] {
        let _ = write!(
            h,
            "<tr data-type=\"{class}\" data-value=\"{value}\"><td><span class=\"swatch\" style=\"background:var(--{class})\"></span>{class}</td>\
             <td>{}</td><td style=\"width:45%\"><div class=\"bar\" style=\"width:{:.1}%;background:var(--{class})\"></div></td></tr>",
            grouped(value),
            100.0 * value as f64 / max as f64
        );
    }
    h.push_str("</table></div>");
}

fn denials(h: &mut String, data: &Data) {
    h.push_str("<div class=\"panel\"><h2>Denials by reason</h2>");
    if data.denials.is_empty() {
        h.push_str("<p class=\"muted\" id=\"denials\">No denied requests in this period.</p></div>");
        return;
    }
    h.push_str("<div class=\"scroll\"><table id=\"denials\"><tr><th>reason</th><th>requests</th></tr>");
    for (reason, t) in &data.denials {
        let _ = write!(
            h,
            "<tr data-reason=\"{r}\" data-requests=\"{}\"><td class=\"name\">{r}</td><td>{}</td></tr>",
            t.requests,
            grouped(t.requests),
            r = esc(reason)
        );
    }
    h.push_str("</table></div></div>");
}

/// A row of token columns with `data-*` values.
fn token_cells(t: &Totals) -> (String, String) {
    let attrs = format!(
        "data-requests=\"{}\" data-prompt=\"{}\" data-completion=\"{}\" data-cached=\"{}\" data-reasoning=\"{}\"",
        t.requests, t.prompt, t.completion, t.cached, t.reasoning
    );
    let cells = [t.requests, t.prompt, t.completion, t.cached, t.reasoning]
        .map(|v| format!("<td>{}</td>", grouped(v)))
        .concat();
    (attrs, cells)
}

const TOKEN_HEADS: &str = "<th>requests</th><th>prompt</th><th>completion</th><th>cached</th><th>reasoning</th>";

fn users(h: &mut String, view: &View, data: &Data) {
    h.push_str("<div class=\"panel\"><h2>Top users</h2>");
    if data.users.is_empty() {
        h.push_str("<p class=\"muted\" id=\"users\">No authorized requests in this period.</p></div>");
        return;
    }
    let max = data.users.first().map_or(1, |(_, t)| tokens(t).max(1));
    let _ = write!(
        h,
        "<div class=\"scroll\"><table id=\"users\"><tr><th>user</th><th>tokens</th><th></th>{TOKEN_HEADS}</tr>"
    );
    for (user, t) in data.users.iter().take(TOP_USERS) {
        let (attrs, cells) = token_cells(t);
        let _ = write!(
            h,
            "<tr data-user=\"{u}\" {attrs}><td class=\"name\"><a href=\"{}\">{u}</a></td><td>{}</td>\
             <td style=\"width:20%\"><div class=\"bar\" style=\"width:{:.1}%\"></div></td>{cells}</tr>",
            esc(&link(view, Some(user), None)),
            grouped(tokens(t)),
            100.0 * tokens(t) as f64 / max as f64,
            u = esc(user)
        );
    }
    h.push_str("</table></div>");
    if data.users.len() > TOP_USERS {
        let _ = write!(h, "<p class=\"muted\">and {} more users.</p>", data.users.len() - TOP_USERS);
    }
    h.push_str("</div>");
}

fn models(h: &mut String, data: &Data) {
    h.push_str("<section><h2>Per model</h2>");
    if data.models.is_empty() {
        h.push_str("<p class=\"muted\" id=\"models\">No authorized requests in this period.</p></section>");
        return;
    }
    let _ = write!(h, "<div class=\"scroll\"><table id=\"models\"><tr><th>model</th><th>tokens</th>{TOKEN_HEADS}</tr>");
    for (model, t) in &data.models {
        let (attrs, cells) = token_cells(t);
        let shown = if model.is_empty() { "<span class=\"muted\">(none)</span>".to_owned() } else { esc(model) };
        let _ = write!(
            h,
            "<tr data-model=\"{}\" {attrs}><td class=\"name\">{shown}</td><td>{}</td>{cells}</tr>",
            esc(model),
            grouped(tokens(t))
        );
    }
    h.push_str("</table></div></section>");
}

fn recent(h: &mut String, view: &View, data: &Data) {
    let (Some(user), Some(events)) = (&view.user, &data.recent) else {
        h.push_str("<section><h2>Recent events</h2><p class=\"muted\">Choose a user (above, or in Top users) to see their latest events.</p></section>");
        return;
    };
    let _ = write!(h, "<section><h2>Recent events of {}</h2>", esc(user));
    if !data.known_user {
        let _ = write!(
            h,
            "<p class=\"muted\" id=\"recent\">No usage was ever recorded for user {}.</p></section>",
            esc(user)
        );
        return;
    }
    let _ = write!(
        h,
        "<div class=\"scroll\"><table id=\"recent\"><tr><th>time (UTC)</th><th>model</th><th>path</th><th>status</th>\
         <th>prompt</th><th>completion</th><th>cached</th><th>reasoning</th><th>groups</th></tr>"
    );
    for e in events {
        let t = time::format_rfc3339(e.ts_ms);
        let status = e.status.map_or("–".to_owned(), |s| s.to_string());
        let incomplete = if e.incomplete { " <span class=\"muted\">(incomplete)</span>" } else { "" };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"name\">{}</td><td>{}</td><td>{status}{incomplete}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"name\">{}</td></tr>",
            esc(t.get(..19).unwrap_or(&t)).replace('T', " "),
            esc(&e.model),
            esc(&e.path),
            grouped(e.tokens.prompt),
            grouped(e.tokens.completion),
            grouped(e.tokens.cached),
            grouped(e.tokens.reasoning),
            esc(&e.groups)
        );
    }
    h.push_str("</table></div>");
    if events.is_empty() {
        h.push_str("<p class=\"muted\">Its events are older than the ledger's retention.</p>");
    }
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_numbers() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        let cases = [(0, "0", "0"), (999, "999", "999"), (1_000, "1,000", "1k"), (1_234_567, "1,234,567", "1.235M")];
        for (n, long, brief) in cases {
            assert_eq!((grouped(n).as_str(), short(n).as_str()), (long, brief), "{n}");
        }
        let nice_cases = [(0, 4), (3, 4), (5, 8), (9, 20), (41, 80), (1_000, 2_000)];
        for (max, top) in nice_cases {
            assert_eq!(nice(max), top, "{max}");
        }
    }
}
