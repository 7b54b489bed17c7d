//! Commands that talk to a node over HTTP: `drl check --node`,
//! `drl rules get|put|validate` (`put` against the version it read first,
//! with If-Match, unless `--force`) and `drl members [--forget SLOT]`.

use std::path::Path;

use super::{parse_fields, runtime, CheckCommand, CliError};
use crate::http::client::{Answer, Connection};

/// The node an admin command talks to, and its token.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The node's HTTP address, as http://host:port.
    #[arg(long, env = "DRL_NODE", default_value = "http://127.0.0.1:8400")]
    pub node: String,
    /// The node's admin token.
    #[arg(long, env = "DRL_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `drl check --node URL -f name=value ...`: one `POST /v1/check` per
/// repeat; [`CliError::Denied`] if any was answered 429.
pub fn check(node: &str, args: &CheckCommand) -> Result<(), CliError> {
    let fields = parse_fields(&args.fields)?;
    let mut body = serde_json::Map::new();
    for (name, value) in fields {
        body.insert(name, serde_json::Value::String(value));
    }
    body.insert("cost".into(), args.cost.into());
    let body = serde_json::Value::Object(body).to_string();
    runtime()?.block_on(async {
        let mut conn = Connection::open(node).await?;
        let mut denied = 0;
        for i in 1..=args.repeat {
            let answer = conn.post_json("/v1/check", &body).await?;
            match answer.status {
                200 => {}
                429 => denied += 1,
                // A refusal is no decision: its reason is the error.
                _ => return Err(refused(&answer)),
            }
            print_decision(i, &answer);
        }
        match denied {
            0 => Ok(()),
            denied => Err(CliError::Denied {
                denied,
                sent: args.repeat,
            }),
        }
    })
}

fn print_decision(i: u32, answer: &Answer) {
    let json = answer.json();
    let outcome = json["outcome"].as_str().unwrap_or("?");
    let mut line = format!("{i}: {} {outcome}", answer.status);
    match json["rule"].as_str() {
        None => line.push_str("  (no limit applies)"),
        Some(rule) => {
            line.push_str(&format!(
                "  limit {} per {}ms  remaining {}  reset {}ms  retry-after {}ms  ({rule})",
                json["limit"],
                json["window_ms"],
                json["remaining"],
                json["reset_ms"],
                json["retry_after_ms"]
            ));
        }
    }
    for h in ["ratelimit-policy", "ratelimit", "retry-after"] {
        if let Some(v) = answer.header(h) {
            line.push_str(&format!("\n   {h}: {v}"));
        }
    }
    println!("{line}");
}

fn refused(answer: &Answer) -> CliError {
    CliError::Refused {
        status: answer.status,
        body: answer.json()["error"]
            .as_str()
            .map_or_else(|| answer.text(), str::to_owned),
    }
}

fn auth_header(token: Option<&str>) -> Option<String> {
    token.map(|t| format!("Bearer {t}"))
}

async fn admin_request(
    node: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Answer, CliError> {
    let mut conn = Connection::open(node).await?;
    admin_call(&mut conn, token, method, path, &[], body).await
}

/// One admin request on its own connection; anything but 200 is refused.
fn admin_ok(args: &AdminArgs, method: &str, path: &str) -> Result<Answer, CliError> {
    let answer = runtime()?.block_on(admin_request(
        &args.node,
        args.token.as_deref(),
        method,
        path,
        b"",
    ))?;
    if answer.status != 200 {
        return Err(refused(&answer));
    }
    Ok(answer)
}

async fn admin_call(
    conn: &mut Connection,
    token: Option<&str>,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, CliError> {
    let auth = auth_header(token);
    let mut headers = extra.to_vec();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if !body.is_empty() {
        headers.push(("content-type", "application/toml"));
    }
    Ok(conn.request(method, path, &headers, body).await?)
}

/// A version as the admin API writes it: `counter.origin.digest`.
fn version(v: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        v["counter"],
        v["origin"],
        v["digest"].as_str().unwrap_or("?")
    )
}

/// `drl rules get`: the rules text to stdout, its version to stderr.
pub fn rules_get(args: &AdminArgs) -> Result<(), CliError> {
    let answer = admin_ok(args, "GET", "/v1/rules")?;
    let json = answer.json();
    eprintln!(
        "# version {}{}",
        version(&json["version"]),
        json["file_error"]
            .as_str()
            .map(|e| format!(" (the rules file failed to reload: {e})"))
            .unwrap_or_default()
    );
    print!("{}", json["text"].as_str().unwrap_or(""));
    Ok(())
}

fn read(file: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(file).map_err(|source| CliError::Read {
        path: file.to_owned(),
        source,
    })
}

fn print_limits(json: &serde_json::Value) {
    for l in json["limits"].as_array().into_iter().flatten() {
        println!(
            "  {:<24} {:<14} {:<14} quota {} per {}ms",
            l["rule"].as_str().unwrap_or(""),
            l["scope"].as_str().unwrap_or(""),
            l["algorithm"].as_str().unwrap_or(""),
            l["limit"],
            l["window_ms"]
        );
    }
}

/// How `drl rules put` makes its change.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// No If-Match: replace whatever is in force.
    pub force: bool,
    /// `?allow_empty=true`: rules that deny nothing may go in force.
    pub allow_empty: bool,
}

/// `drl rules put FILE`: replaces the rules cluster-wide, against the
/// version in force when it starts (If-Match) unless `--force`, and says
/// what happened.
pub fn rules_put(file: &Path, args: &AdminArgs, options: PutOptions) -> Result<(), CliError> {
    let body = read(file)?;
    let token = args.token.as_deref();
    let path = if options.allow_empty {
        "/v1/rules?allow_empty=true"
    } else {
        "/v1/rules"
    };
    let (read_etag, answer) = runtime()?.block_on(async {
        let mut conn = Connection::open(&args.node).await?;
        let mut etag = None;
        if !options.force {
            let current = admin_call(&mut conn, token, "GET", "/v1/rules", &[], b"").await?;
            if current.status != 200 {
                return Err(refused(&current));
            }
            etag = current.header("etag").map(str::to_owned);
        }
        let extra: Vec<(&str, &str)> = etag.iter().map(|e| ("if-match", e.as_str())).collect();
        let answer = admin_call(&mut conn, token, "PUT", path, &extra, &body).await?;
        Ok((etag, answer))
    })?;
    let json = answer.json();
    let etag = answer.header("etag").unwrap_or("?");
    match answer.status {
        200 => {
            println!(
                "rules in force on every live node: version {} (replaced {}; confirmed by peer slots {})",
                version(&json["version"]),
                version(&json["replaced"]),
                json["confirmed_by"]
            );
            print_limits(&json);
            Ok(())
        }
        412 => Err(CliError::Refused {
            status: 412,
            body: format!(
                "not changed: the rules changed since they were read (read {}, now {etag}). \
             Read them again (drl rules get) and redo the change, or use --force to overwrite",
                read_etag.as_deref().unwrap_or("?")
            ),
        }),
        409 => Err(CliError::Refused {
            status: 409,
            body: format!(
                "not in force: another change made at the same time won (now {etag}). \
             Read the rules again (drl rules get) and redo the change if it is still needed.\n  {}",
                json["error"].as_str().unwrap_or("")
            ),
        }),
        _ => Err(refused(&answer)),
    }
}

/// `drl rules validate FILE --node URL`: the node's verdict.
pub fn rules_validate(file: &Path, node: &str, token: Option<&str>) -> Result<(), CliError> {
    let body = read(file)?;
    let answer = runtime()?.block_on(admin_request(
        node,
        token,
        "POST",
        "/v1/rules/validate",
        &body,
    ))?;
    if answer.status != 200 {
        let e = refused(&answer);
        return Err(CliError::Usage(format!("{}: {e}", file.display())));
    }
    let json = answer.json();
    println!("{}: ok", file.display());
    print_limits(&json);
    Ok(())
}

fn print_members(json: &serde_json::Value) {
    println!(
        "{} (slot {}){}",
        json["name"].as_str().unwrap_or("?"),
        json["slot"],
        if json["minority"].as_bool() == Some(true) {
            ": in the minority (it forgets no member that died; forget those gone for good with `drl members --forget SLOT`)"
        } else {
            ""
        }
    );
    for m in json["members"].as_array().into_iter().flatten() {
        let state = match (m["live"].as_bool(), m["connected"].as_bool()) {
            (Some(true), Some(true)) => "live",
            (Some(true), _) => "live, not connected",
            _ => "dead or unreachable",
        };
        println!(
            "  slot {:<5} {:<24} {state}",
            m["slot"],
            m["name"].as_str().unwrap_or("")
        );
    }
}

/// `drl members`: the members a node counts, and whether it is in the
/// minority.
pub fn members_list(args: &AdminArgs) -> Result<(), CliError> {
    let answer = admin_ok(args, "GET", "/v1/members")?;
    print_members(&answer.json());
    Ok(())
}

/// `drl members --forget SLOT...`: one forget per slot, in order; stops at
/// the first refusal (which changed nothing) and prints the members after.
pub fn members_forget(args: &AdminArgs, slots: &[u16]) -> Result<(), CliError> {
    let token = args.token.as_deref();
    let last = runtime()?.block_on(async {
        let mut conn = Connection::open(&args.node).await?;
        let mut last = None;
        for slot in slots {
            let path = format!("/v1/members/{slot}/forget");
            let answer = admin_call(&mut conn, token, "POST", &path, &[], b"").await?;
            if answer.status != 200 {
                return Err(refused(&answer));
            }
            println!("slot {slot} forgotten");
            last = Some(answer);
        }
        Ok(last)
    })?;
    if let Some(answer) = last {
        print_members(&answer.json());
    }
    Ok(())
}
