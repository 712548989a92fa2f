//! The management API's error shapes, asked over a raw TCP socket (no client library smoothing
//! anything over): every error is `{"error": "..."}` JSON with the right status, including the
//! requests axum itself rejects (malformed JSON, wrong content type, missing fields, unknown
//! routes, wrong methods); and the OpenAPI document lists only routes that exist.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::edge::EdgeDaemon;
use common::etcd::Etcd;
use common::Daemon;
use serde_json::Value;

/// One HTTP/1.1 request; the status, the Content-Type and the body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        request.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// Assert an error answer: `status`, JSON, `{"error": "..."}` containing `needle`.
fn assert_error(answer: (u16, String, String), status: u16, needle: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(got, status, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type:?} of {body}"
    );
    let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let error = value["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"));
    assert!(
        error.to_lowercase().contains(&needle.to_lowercase()),
        "{error:?} lacks {needle:?}"
    );
    assert_eq!(value.as_object().unwrap().len(), 1, "{body}");
}

const JSON: Option<&str> = Some("application/json");

#[test]
fn every_node_api_error_is_json_with_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let api = daemon.api.as_str();

    // Malformed JSON: 400.
    assert_error(
        http(api, "POST", "/v1/volumes", JSON, "{\"name\": \"v\","),
        400,
        "json",
    );
    // Not JSON at all (wrong content type): 415.
    assert_error(
        http(api, "POST", "/v1/volumes", Some("text/plain"), "name=v"),
        415,
        "application/json",
    );
    assert_error(
        http(
            api,
            "POST",
            "/v1/volumes",
            None,
            "{\"name\":\"v\",\"size\":1}",
        ),
        415,
        "application/json",
    );
    // Well-formed JSON of the wrong shape: 422 (missing field, unknown field, wrong type).
    assert_error(
        http(api, "POST", "/v1/volumes", JSON, "{\"name\": \"v\"}"),
        422,
        "missing field `size`",
    );
    assert_error(
        http(
            api,
            "POST",
            "/v1/volumes",
            JSON,
            "{\"name\":\"v\",\"size\":67108864,\"colour\":1}",
        ),
        422,
        "unknown field `colour`",
    );
    assert_error(
        http(
            api,
            "POST",
            "/v1/volumes",
            JSON,
            "{\"name\":\"v\",\"size\":\"big\"}",
        ),
        422,
        "size",
    );
    // Unknown routes: 404; wrong methods: 405 (with Allow).
    assert_error(
        http(api, "GET", "/v1/nothing", None, ""),
        404,
        "no such API route",
    );
    assert_error(
        http(api, "GET", "/nope", None, ""),
        404,
        "no such API route",
    );
    // `/` is the dashboard page, and only GET serves it.
    let (status, content_type, body) = http(api, "GET", "/", None, "");
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/html") && body.contains("<title>vstor dashboard</title>")
    );
    assert_error(http(api, "POST", "/", JSON, "{}"), 405, "not allowed");
    assert_error(
        http(api, "PUT", "/v1/volumes", JSON, "{}"),
        405,
        "method PUT is not allowed",
    );
    assert_error(
        http(api, "GET", "/v1/volumes/v/resize", None, ""),
        405,
        "not allowed",
    );
    // A bad query: 400.
    assert_error(
        http(api, "DELETE", "/v1/volumes/v?force=maybe", None, ""),
        400,
        "force",
    );
    // The API's own errors keep their shape and status.
    assert_error(
        http(api, "GET", "/v1/volumes/nosuch", None, ""),
        404,
        "does not exist",
    );
    assert_error(
        http(
            api,
            "POST",
            "/v1/volumes",
            JSON,
            "{\"name\":\"bad/name\",\"size\":67108864}",
        ),
        400,
        "invalid volume name",
    );
    let created = http(
        api,
        "POST",
        "/v1/volumes",
        JSON,
        "{\"name\":\"v\",\"size\":67108864}",
    );
    assert_eq!(created.0, 201, "{}", created.2);
    assert_error(
        http(
            api,
            "POST",
            "/v1/volumes",
            JSON,
            "{\"name\":\"v\",\"size\":67108864}",
        ),
        409,
        "already exists",
    );
    // An optional body may be left out, but not be malformed.
    let (status, _, body) = http(api, "POST", "/v1/volumes/v/scrub", None, "");
    assert_eq!(status, 200, "{body}");
    assert_error(
        http(api, "POST", "/v1/volumes/v/scrub", JSON, "{\"rate\": -1}"),
        422,
        "rate",
    );
}

#[test]
fn the_openapi_document_describes_the_routes_that_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let (status, content_type, body) = http(&daemon.api, "GET", "/v1/openapi.json", None, "");
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with("application/json"));
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "VolumeView",
        "CreateRequest",
        "ErrorBody",
        "SnapshotView",
        "CloneRequest",
    ] {
        assert!(schemas.contains_key(schema), "no schema {schema}");
    }
    let required: Vec<&str> = schemas["CreateRequest"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["name", "size"]);
    // Every documented route is routed: asked with its method (on a volume that does not
    // exist), no answer is "no such route" or "method not allowed".
    let paths = doc["paths"].as_object().unwrap();
    // The router's 21 paths (27 method/path pairs), every one documented.
    assert_eq!(paths.len(), 21, "{:?}", paths.keys().collect::<Vec<_>>());
    let mut asked = 0;
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let concrete = path.replace("{name}", "nosuch").replace("{snap}", "nosnap");
            let method = method.to_uppercase();
            let (status, _, body) = http(&daemon.api, &method, &concrete, JSON, "{}");
            assert!(
                status != 405 && !body.contains("no such API route"),
                "{method} {path}: {status} {body}"
            );
            asked += 1;
        }
    }
    assert_eq!(asked, 27);
    // And the routes are documented with their error shape.
    assert!(paths["/v1/volumes/{name}"]["get"]["responses"]["4XX"].is_object());
}

#[test]
fn cluster_and_edge_api_errors_are_json() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(tmp.path());
    let url = etcd.url();
    let dir = tmp.path().join("n1");
    std::fs::create_dir_all(&dir).unwrap();
    let node = Daemon::start_with(&dir, &["--registry", &url, "--node", "n1"]);
    // Cluster routes.
    assert_error(
        http(
            &node.api,
            "POST",
            "/v1/volumes/v/move",
            JSON,
            "{\"timeout_secs\": 5}",
        ),
        422,
        "missing field `to`",
    );
    assert_error(
        http(
            &node.api,
            "POST",
            "/v1/volumes/v/takeover",
            Some("text/plain"),
            "x",
        ),
        415,
        "application/json",
    );
    assert_error(
        http(&node.api, "DELETE", "/v1/nodes", None, ""),
        405,
        "not allowed",
    );
    let (status, _, body) = http(&node.api, "GET", "/v1/cluster/registry", None, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["reachable"],
        true
    );

    // The edge's API.
    let edge = EdgeDaemon::start(tmp.path(), "e1", &url, &[]);
    assert_error(
        http(
            &edge.api,
            "POST",
            "/v1/attachments",
            JSON,
            "{\"volume\": \"v\",",
        ),
        400,
        "json",
    );
    assert_error(
        http(&edge.api, "POST", "/v1/attachments", JSON, "{}"),
        422,
        "missing field `volume`",
    );
    assert_error(
        http(
            &edge.api,
            "POST",
            "/v1/attachments",
            Some("text/plain"),
            "v",
        ),
        415,
        "application/json",
    );
    assert_error(
        http(&edge.api, "GET", "/v1/nothing", None, ""),
        404,
        "no such API route",
    );
    assert_error(
        http(&edge.api, "PATCH", "/v1/attachments", JSON, "{}"),
        405,
        "not allowed",
    );
    assert_error(
        http(
            &edge.api,
            "DELETE",
            "/v1/attachments/nosuch?force=maybe",
            None,
            "",
        ),
        400,
        "force",
    );
    assert_error(
        http(&edge.api, "DELETE", "/v1/attachments/nosuch", None, ""),
        404,
        "nosuch",
    );
}
