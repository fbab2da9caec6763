#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! `tollgate usage` (issue 18): its library function, [`harness::usage::report`],
//! against a real stack with a SQLite ledger and the usage API on. After authorized
//! requests through the gateway, the report's totals by user, day and model equal what
//! was sent (the requests, and the tokens the mock model reported), for named users
//! and for all users; a wrong token and an
//! unknown user are errors that say so.

use std::time::Duration;

use harness::usage::{self, By, Query, UsageError};
use serde_json::{json, Value};
use tollgate_e2e::*;

#[test]
fn usage_report_totals_equal_the_requests_sent() {
    let creds = DevCredentials::generate();
    let stack = start_with("usage-cli", &creds, json!({}), StackOptions { ledger: true, ..StackOptions::default() });
    let auth = format!("Bearer {}", creds.api_key);

    let (mut prompt, mut completion) = (0, 0);
    let sent = 4;
    for i in 0..sent {
        let resp = chat(&stack, &[("authorization", &auth)], &chat_body(3 + i, 5, false));
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().unwrap();
        prompt += body["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += body["usage"]["completion_tokens"].as_u64().unwrap();
    }

    let query = |by: By| Query {
        tracker_url: stack.tracker_url.clone(),
        api_token: stack.api_token.clone(),
        users: vec![creds.user.clone()],
        since: Some("1h".into()),
        until: None,
        by,
    };
    // The filter reports in batches: poll until the ledger has every request.
    let report = eventually(Duration::from_secs(30), "the ledger has every request", || {
        usage::report(&query(By::User)).ok().filter(|r| r.total.requests == sent as u64)
    });
    assert_eq!((report.total.prompt_tokens, report.total.completion_tokens), (prompt, completion));
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].labels, std::slice::from_ref(&creds.user));
    assert_eq!(report.answers.len(), 1);
    let answer: Value = serde_json::from_str(&report.answers[0]).unwrap();
    assert_eq!(answer["total"]["requests"], sent as u64);
    let table = usage::table(By::User, &report.rows, &report.total);
    assert!(table.starts_with("USER"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with(&creds.user), "{table}");

    for by in [By::Day, By::Model] {
        let r = usage::report(&query(by)).unwrap();
        assert_eq!(r.total, report.total, "{by:?}");
        assert!(!r.rows.is_empty(), "{by:?}");
    }
    let by_model = usage::report(&query(By::Model)).unwrap();
    assert_eq!(by_model.rows.len(), 1);
    assert_eq!(by_model.rows[0].labels, [creds.user.clone(), "mock-model".to_string()]);
    // Without --user: every user of the range (this stack has had only one).
    for by in [By::User, By::Model] {
        let r = usage::report(&Query { users: vec![], ..query(by) }).unwrap();
        assert_eq!(r.total, report.total, "{by:?} of all users");
        assert_eq!(r.rows[0].labels[0], if by == By::User { creds.user.as_str() } else { usage::ALL_USERS });
    }

    // Errors carry the tracker's status and say what is wrong.
    let wrong = Query { api_token: "not-the-token".into(), ..query(By::User) };
    let e = usage::report(&wrong).unwrap_err();
    assert_eq!(e.downcast_ref::<UsageError>().map(|e| e.status), Some(401), "{e:#}");
    assert!(e.to_string().contains("the token is wrong"), "{e:#}");
    let nobody = Query { users: vec!["nobody-at-all".into()], ..query(By::User) };
    let e = usage::report(&nobody).unwrap_err();
    assert_eq!(e.downcast_ref::<UsageError>().map(|e| e.status), Some(404), "{e:#}");
    assert!(e.to_string().contains("no usage was ever recorded"), "{e:#}");
}
