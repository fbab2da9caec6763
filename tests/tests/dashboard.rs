#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The Grafana dashboard (istio/dashboards/tollgate.json) against the real stack: after
//! authorized, streamed, rate-limited and denied traffic through Envoy with the filter,
//! every panel's PromQL, with the dashboard's variables substituted as Grafana would,
//! runs through the real Prometheus that scraped the real tracker. Each query must
//! parse and evaluate; the main panels must show the users, groups, models, token
//! types and deny reasons of the traffic; with a concrete `$user` they show only that
//! user; and the `user` / `model` variables list what was sent.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::*;

const MODEL: &str = "mock-model";

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../istio/dashboards/tollgate.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// (panel title, refId, expr) of every target, rows' nested panels included.
fn targets(dash: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_default().to_string();
                out.push((p["title"].as_str().unwrap().into(), t["refId"].as_str().unwrap().into(), expr));
            }
            walk(p["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), out);
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().unwrap(), &mut out);
    out
}

/// `expr` as Grafana sends it: `$user` / `$model` (a multi-value variable inside `=~`,
/// so a regex: `.*` for All), and the interval macros for a 5-minute view.
fn render(expr: &str, user: &str, model: &str) -> String {
    let out = expr
        .replace("${user}", user)
        .replace("$user", user)
        .replace("${model}", model)
        .replace("$model", model)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    assert!(!out.contains('$'), "a variable left unsubstituted in {out}");
    out
}

/// An instant query: `Ok(result)`, or `Err` with Prometheus's answer when it refused it.
fn query(prom: &str, q: &str) -> Result<Vec<Value>, String> {
    let resp = client().get(format!("{prom}/api/v1/query")).query(&[("query", q)]).send().unwrap();
    let code = resp.status();
    let body: Value = resp.json().unwrap();
    if code.is_success() && body["status"] == "success" {
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    } else {
        Err(format!("{code}: {body}"))
    }
}

/// The values of `label` over a query result.
fn label_values(result: &[Value], label: &str) -> BTreeSet<String> {
    result.iter().filter_map(|s| s["metric"][label].as_str().map(str::to_string)).collect()
}

fn find<'a>(all: &'a [(String, String, String)], title: &str, ref_id: &str) -> &'a str {
    all.iter()
        .find(|(t, r, _)| t == title && r == ref_id)
        .map(|(_, _, e)| e.as_str())
        .unwrap_or_else(|| panic!("the dashboard has no panel \"{title}\" with target {ref_id}"))
}

#[test]
fn every_dashboard_query_parses_and_the_main_panels_show_the_traffic() {
    let dash = dashboard();
    let all = targets(&dash);
    assert!(all.len() >= 20, "only {} targets", all.len());

    let (alice, bob, carol) = (dev::new_api_key(), dev::new_api_key(), dev::new_api_key());
    let config = json!({
        "api_keys": {"keys": [
            dev::key_entry(&alice, "alice", &["free".to_string()]),
            dev::key_entry(&bob, "bob", &["premium".to_string()]),
            dev::key_entry(&carol, "carol", &["limited".to_string()]),
        ]},
        "limits": {"groups": {"limited": {"requests_per_minute": 2}}}
    });
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        prometheus: true,
        // A SQLite ledger: as in a cluster, and the tracker then exports its ledger errors.
        ledger: true,
        label: "dashboard".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let prom = stack.prometheus_url.clone().unwrap();

    // alice: 3 plain and 2 streamed chats; bob: 2 plain and 1 streamed.
    for (key, plain, streamed) in [(&alice, 3, 2), (&bob, 2, 1)] {
        let auth = format!("Bearer {key}");
        for i in 0..plain + streamed {
            let resp = chat(&stack, &[("authorization", &auth)], &chat_body(3, 4, i >= plain));
            assert_eq!(resp.status(), 200);
            let text = resp.text().unwrap();
            assert!(i < plain || text.contains("data: [DONE]"), "{text}");
        }
    }
    // carol: 5 requests against 2 per minute: the rest are 429 rate_limit_exceeded.
    let auth = format!("Bearer {carol}");
    let statuses: Vec<u16> =
        (0..5).map(|_| chat(&stack, &[("authorization", &auth)], &chat_body(1, 1, false)).status().as_u16()).collect();
    let carol_ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(carol_ok >= 1 && statuses.contains(&429), "carol: {statuses:?}");
    // Denied: two without a credential, one with a wrong key.
    for headers in [vec![], vec![], vec![("x-api-key", "wrong")]] {
        assert_eq!(chat(&stack, &headers, &chat_body(1, 1, false)).status(), 401);
    }

    // Prometheus has scraped the tracker once every request is counted.
    let want = [("alice", 5), ("bob", 3), ("carol", carol_ok)];
    eventually(Duration::from_secs(60), "llm_requests_total per user in Prometheus", || {
        let r = query(&prom, "sum by (user) (llm_requests_total)").ok()?;
        want.iter()
            .all(|(u, n)| r.iter().any(|s| s["metric"]["user"] == *u && s["value"][1].as_str() == Some(&n.to_string())))
            .then_some(())
    });

    // The main panels show the traffic (rates need two samples in their window: poll).
    let users = ["alice", "bob", "carol"];
    let main: Vec<(&str, &str, &str, Vec<&str>)> = vec![
        ("Requests per second by user", "A", "user", users.to_vec()),
        ("Requests per second by group", "A", "groups", vec!["free", "premium", "limited"]),
        ("Requests per second by route", "A", "path", vec!["/v1/chat/completions"]),
        ("Tokens per second by user", "A", "user", users.to_vec()),
        ("Tokens per second by model", "A", "model", vec![MODEL]),
        ("Tokens per second by type", "A", "type", vec!["prompt", "completion", "cached", "reasoning"]),
        ("Tokens per second by group", "A", "groups", vec!["free", "premium", "limited"]),
        ("Tokens by user, model and type (totals)", "A", "user", users.to_vec()),
        ("Top users by tokens", "A", "user", users.to_vec()),
        ("Top users by requests", "A", "user", users.to_vec()),
        ("Top models by tokens", "A", "model", vec![MODEL]),
        ("Denials by reason", "A", "reason", vec!["missing_credential", "invalid_credential", "rate_limited"]),
        ("Limit hits (429) by code", "A", "reason", vec!["rate_limited"]),
        ("Denials by route", "A", "path", vec!["/v1/chat/completions"]),
        (
            "/track requests rejected by reason",
            "A",
            "reason",
            vec!["bad_json", "invalid_event", "too_large", "unauthorized"],
        ),
        ("Ledger errors by operation", "A", "op", vec!["write", "read", "compact"]),
        ("Global limit syncs by outcome", "A", "outcome", vec!["ok", "invalid", "unauthorized", "unavailable"]),
        ("Managed key resolves by outcome", "A", "outcome", vec!["found", "unknown"]),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        missing = main
            .iter()
            .filter_map(|(title, r, label, values)| {
                let q = render(find(&all, title, r), ".*", ".*");
                let got = label_values(&query(&prom, &q).unwrap_or_else(|e| panic!("{title}: {q}: {e}")), label);
                let lacking: Vec<_> = values.iter().filter(|v| !got.contains(**v)).collect();
                (!lacking.is_empty()).then(|| format!("{title} [{q}]: {label} {lacking:?} missing, got {got:?}"))
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(missing.is_empty(), "main panels without the expected series:\n{}", missing.join("\n"));

    // Every target parses and evaluates, with All and with a concrete user and model;
    // with user alice, a result that has a user label names only alice.
    let mut report = Vec::new();
    let mut with_series = 0;
    for (title, r, expr) in &all {
        let q = render(expr, ".*", ".*");
        let result = query(&prom, &q).unwrap_or_else(|e| panic!("{title} {r}: Prometheus refused {q}: {e}"));
        with_series += usize::from(!result.is_empty());
        report.push(format!("{:>3} series  {title} {r}", result.len()));
        let q = render(expr, "alice", MODEL);
        let one = query(&prom, &q).unwrap_or_else(|e| panic!("{title} {r}: Prometheus refused {q}: {e}"));
        let others: BTreeSet<_> = label_values(&one, "user").into_iter().filter(|u| u != "alice").collect();
        assert!(others.is_empty(), "{title} {r} with $user=alice shows {others:?}: {q}");
    }
    println!("{} targets, {with_series} with series:\n{}", all.len(), report.join("\n"));

    // The stat panels count the traffic exactly: every series began within the range,
    // and their first samples (which increase() alone misses) are added.
    let denied = 3 + statuses.iter().filter(|s| **s == 429).count();
    for (title, want) in
        [("Requests", Some(8 + carol_ok)), ("Denied", Some(denied)), ("Tokens", None), ("Limit hits (429)", None)]
    {
        let q = render(find(&all, title, "A"), ".*", ".*");
        let v: f64 = query(&prom, &q).unwrap()[0]["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v > 0.0, "stat \"{title}\" is {v}: {q}");
        if let Some(want) = want {
            assert!((v - want as f64).abs() < 0.01, "stat \"{title}\" is {v}, want {want}: {q}");
        }
    }

    // The variables: label_values(metric, label) lists what was sent.
    let vars = dash["templating"]["list"].as_array().unwrap();
    for (name, want) in [("user", users.to_vec()), ("model", vec![MODEL])] {
        let var = vars.iter().find(|v| v["name"] == name).unwrap();
        let def = var["definition"].as_str().unwrap();
        let inner = def.strip_prefix("label_values(").and_then(|d| d.strip_suffix(')')).unwrap();
        let (metric, label) = inner.rsplit_once(',').unwrap();
        let q = render(&format!("count by ({}) ({metric})", label.trim()), ".*", ".*");
        let got = label_values(&query(&prom, &q).unwrap(), label.trim());
        assert!(want.iter().all(|w| got.contains(*w)), "variable {name} ({def}): {got:?}");
    }
}
