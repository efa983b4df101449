# Sourced by local.sh and docker.sh: the demo catalog a new cluster starts with. Expects `say`
# and `ctl` (residencyctl against the cluster) to be defined by the script that sources it.

# A small demo catalog on a new cluster: three US locations in different regions, one German
# location for contrast, and the US policy (store: US; access: US). Fixed request ids make a
# repeated run (after an interrupted `up`) apply each write once. A cluster whose catalog an
# operator emptied by hand is not seeded again: retired locations stay listed.
seed_demo_catalog() {
    say "seeding the demo catalog and the US policy..."
    local -a locations=(
        "us-east-1/oci-ashburn/pg-042 US oci us-east-1 us-east-1a"
        "us-central-1/oci-chicago/pg-007 US oci us-central-1 us-central-1b"
        "us-west-2/oci-phoenix/pg-013 US oci us-west-2 us-west-2a"
        "eu-central-1/oci-frankfurt/pg-001 DE oci eu-central-1 eu-central-1a"
    )
    local n=0 entry id jurisdiction provider region zone
    for entry in "${locations[@]}"; do
        read -r id jurisdiction provider region zone <<<"$entry"
        n=$((n + 1))
        ctl -o json location add "$id" --jurisdiction "$jurisdiction" --provider "$provider" \
            --region "$region" --zone "$zone" --request-id "demo-location-$n" --reason "demo catalog" >/dev/null
    done
    ctl -o json policy set US --storage US --access US --request-id demo-policy-us --reason "demo policy" >/dev/null
}
