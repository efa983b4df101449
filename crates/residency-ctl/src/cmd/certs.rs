//! `residencyctl certs`: a development CA and the certificates a cluster needs, so a new user
//! needs no openssl commands. Offline: these commands talk to no node.
//!
//! Every certificate carries its identity as a `spiffe://<trust domain>/<kind>/<name>` URI SAN;
//! a node's also carries its jurisdiction as the subject's country (`C=US`) and the names and
//! addresses clients reach it at (SANs `localhost`, `127.0.0.1`, `::1`, `node<N>`, plus `--san`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use residency_types::identity::TRUST_DOMAIN_DEFAULT;
use residency_types::{Identity, Jurisdiction};

use crate::Failure;

/// Nodes `certs init` issues certificates for at most.
const INIT_NODES_MAX: u64 = 64;
/// Longest validity, in days.
const VALIDITY_DAYS_MAX: u32 = 3_650;
/// How far back a certificate's validity starts, for clocks a little behind, in minutes.
const NOT_BEFORE_SKEW_MINUTES: i64 = 60;

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Creates a CA and certificates for the nodes, one operator and any services, in DIR.
    ///
    /// Example: residencyctl certs init --dir data/certs --nodes 3 --service payments
    Init(InitArgs),
    /// Issues one more certificate from the CA in DIR (its ca.pem and ca.key).
    ///
    /// Example: residencyctl certs issue --dir data/certs --kind service --name billing
    Issue(IssueArgs),
    /// Prints a certificate's identity, country, validity and issuer.
    ///
    /// Example: residencyctl certs show data/certs/node1.pem
    Show { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the files; created if missing.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = TRUST_DOMAIN_DEFAULT)]
    trust_domain: String,
    /// Node certificates node1 .. nodeN.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// The nodes' jurisdiction (their certificates' country).
    #[arg(long, default_value = "US")]
    jurisdiction: String,
    /// Another DNS name or IP address for every node certificate. Repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// The operator's name: operator.pem is `spiffe://<domain>/operator/<NAME>`.
    #[arg(long, default_value = "admin")]
    operator: String,
    /// A service certificate service-<NAME>.pem. Repeatable.
    #[arg(long = "service")]
    services: Vec<String>,
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace a CA already in DIR (every certificate it signed stops being trusted).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Node,
    Service,
    Operator,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, value_enum)]
    kind: Kind,
    /// The service's or operator's name, or the node's id.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = TRUST_DOMAIN_DEFAULT)]
    trust_domain: String,
    /// A node's jurisdiction (its certificate's country).
    #[arg(long, default_value = "US")]
    jurisdiction: String,
    /// Another DNS name or IP address (nodes). Repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// The files' name without extension; by default node<ID>, service-<NAME>, operator-<NAME>.
    #[arg(long)]
    file_name: Option<String>,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        exit_code: 1,
        message: message.into(),
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        exit_code: 2,
        message: message.into(),
    }
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> Failure + '_ {
    move |error| fail(format!("{what}: {error}"))
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .map_err(|error| fail(format!("cannot write {}: {error}", path.display())))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| fail(format!("cannot write {}: {error}", path.display())))
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), Failure> {
    if days == 0 || days > VALIDITY_DAYS_MAX {
        return Err(usage(format!("--days must be 1 to {VALIDITY_DAYS_MAX}")));
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(NOT_BEFORE_SKEW_MINUTES);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// What one certificate is for.
struct Leaf<'a> {
    identity: Identity,
    /// A node's jurisdiction: the subject's country, and it serves as well as calls.
    node_jurisdiction: Option<Jurisdiction>,
    sans: &'a [String],
    days: u32,
}

fn issue_leaf(
    leaf: &Leaf<'_>,
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    file_name: &str,
) -> Result<(), Failure> {
    let mut names: Vec<String> = Vec::new();
    if let Some(_jurisdiction) = leaf.node_jurisdiction {
        names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_string));
        if let residency_types::Principal::Node(id) = leaf.identity.principal() {
            names.push(format!("node{id}"));
        }
        names.extend(leaf.sans.iter().cloned());
    }
    let mut params =
        CertificateParams::new(names).map_err(rcgen_error("a name in --san is not valid"))?;
    let uri = rcgen::string::Ia5String::try_from(leaf.identity.uri())
        .map_err(rcgen_error("the identity"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    params
        .distinguished_name
        .push(DnType::CommonName, leaf.identity.uri());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Some(jurisdiction) = leaf.node_jurisdiction {
        params
            .distinguished_name
            .push(DnType::CountryName, jurisdiction.as_str());
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, leaf.days)?;
    let key = KeyPair::generate().map_err(rcgen_error("generating a key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(rcgen_error("signing the certificate"))?;
    write_file(
        &dir.join(format!("{file_name}.key")),
        &key.serialize_pem(),
        true,
    )?;
    write_file(&dir.join(format!("{file_name}.pem")), &cert.pem(), false)?;
    println!("{}/{file_name}.pem: {}", dir.display(), leaf.identity);
    Ok(())
}

fn parse_jurisdiction(text: &str) -> Result<Jurisdiction, Failure> {
    Jurisdiction::parse(text).map_err(|error| usage(format!("--jurisdiction: {error}")))
}

fn identity(trust_domain: &str, kind: &str, name: &str) -> Result<Identity, Failure> {
    Identity::parse(&format!("spiffe://{trust_domain}/{kind}/{name}"))
        .map_err(|error| usage(error.to_string()))
}

fn init(args: InitArgs) -> Result<(), Failure> {
    if args.nodes == 0 || args.nodes > INIT_NODES_MAX {
        return Err(usage(format!("--nodes must be 1 to {INIT_NODES_MAX}")));
    }
    let jurisdiction = parse_jurisdiction(&args.jurisdiction)?;
    // Check every name before writing anything.
    let mut leaves = Vec::new();
    for id in 1..=args.nodes {
        leaves.push((
            format!("node{id}"),
            identity(&args.trust_domain, "node", &id.to_string())?,
            Some(jurisdiction),
        ));
    }
    leaves.push((
        "operator".to_string(),
        identity(&args.trust_domain, "operator", &args.operator)?,
        None,
    ));
    for service in &args.services {
        leaves.push((
            format!("service-{service}"),
            identity(&args.trust_domain, "service", service)?,
            None,
        ));
    }
    let ca_path = args.dir.join("ca.pem");
    if ca_path.exists() && !args.force {
        println!(
            "{} exists: kept, with the certificates beside it (--force makes a new CA)",
            ca_path.display()
        );
        return Ok(());
    }
    fs::create_dir_all(&args.dir)
        .map_err(|error| fail(format!("cannot create {}: {error}", args.dir.display())))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error("the CA's parameters"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("Residency Registry development CA ({})", args.trust_domain),
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, args.days)?;
    let ca_key = KeyPair::generate().map_err(rcgen_error("generating the CA key"))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(rcgen_error("signing the CA"))?;
    write_file(&args.dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    write_file(&ca_path, &ca_cert.pem(), false)?;
    println!("{}: the CA", ca_path.display());
    let issuer = Issuer::new(ca_params, ca_key);
    for (file_name, identity, node_jurisdiction) in leaves {
        let leaf = Leaf {
            identity,
            node_jurisdiction,
            sans: &args.sans,
            days: args.days,
        };
        issue_leaf(&leaf, &issuer, &args.dir, &file_name)?;
    }
    Ok(())
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, Failure> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name))
            .map_err(|error| fail(format!("cannot read {}: {error}", dir.join(name).display())))
    };
    let key = KeyPair::from_pem(&read("ca.key")?).map_err(rcgen_error("ca.key"))?;
    Issuer::from_ca_cert_pem(&read("ca.pem")?, key).map_err(rcgen_error("ca.pem"))
}

fn issue(args: IssueArgs) -> Result<(), Failure> {
    let (kind, default_file) = match args.kind {
        Kind::Node => ("node", format!("node{}", args.name)),
        Kind::Service => ("service", format!("service-{}", args.name)),
        Kind::Operator => ("operator", format!("operator-{}", args.name)),
    };
    let identity = identity(&args.trust_domain, kind, &args.name)?;
    let node_jurisdiction = match args.kind {
        Kind::Node => Some(parse_jurisdiction(&args.jurisdiction)?),
        _ => None,
    };
    let file_name = args.file_name.unwrap_or(default_file);
    if file_name.is_empty() || file_name.contains('/') || file_name == "ca" {
        return Err(usage("--file-name is a plain file name, not ca"));
    }
    let issuer = load_issuer(&args.dir)?;
    let leaf = Leaf {
        identity,
        node_jurisdiction,
        sans: &args.sans,
        days: args.days,
    };
    issue_leaf(&leaf, &issuer, &args.dir, &file_name)
}

fn show(file: &Path) -> Result<(), Failure> {
    use x509_parser::prelude::*;
    let pem =
        fs::read(file).map_err(|error| fail(format!("cannot read {}: {error}", file.display())))?;
    let (_, pem) = parse_x509_pem(&pem)
        .map_err(|error| fail(format!("{}: not PEM: {error}", file.display())))?;
    let cert = pem
        .parse_x509()
        .map_err(|error| fail(format!("{}: not a certificate: {error}", file.display())))?;
    let mut uris = Vec::new();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uris.push((*uri).to_string()),
                GeneralName::DNSName(name) => names.push((*name).to_string()),
                GeneralName::IPAddress(bytes) => names.push(match *bytes {
                    [a, b, c, d] => std::net::IpAddr::from([*a, *b, *c, *d]).to_string(),
                    _ => <[u8; 16]>::try_from(*bytes)
                        .map(|octets| std::net::IpAddr::from(octets).to_string())
                        .unwrap_or_else(|_| format!("{bytes:?}")),
                }),
                other => names.push(other.to_string()),
            }
        }
    }
    println!("identity:  {}", uris.join(", "));
    println!(
        "country:   {}",
        cert.subject()
            .iter_country()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or("-")
    );
    println!("names:     {}", names.join(", "));
    println!("subject:   {}", cert.subject());
    println!("issuer:    {}", cert.issuer());
    println!("not before: {}", cert.validity().not_before);
    println!("not after:  {}", cert.validity().not_after);
    Ok(())
}

pub fn run(command: CertsCommand) -> Result<(), Failure> {
    match command {
        CertsCommand::Init(args) => init(args),
        CertsCommand::Issue(args) => issue(args),
        CertsCommand::Show { file } => show(&file),
    }
}
