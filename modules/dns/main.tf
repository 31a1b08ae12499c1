locals {
  tags      = merge(var.tags, { "karrots:module" = "dns" })
  zone_name = "${var.name}.${var.parent_domain}"
}

# The cluster's own zone lives in the karrots account.
resource "aws_route53_zone" "cluster" {
  # checkov:skip=CKV2_AWS_38:DNSSEC needs a DS record in the parent zone, which lives in the main account, and karrots-root-dns may write NS records there and nothing else, by design. Sign both zones together where the parent zone is managed.
  # checkov:skip=CKV2_AWS_39:Query logs of a public zone go to a log group in us-east-1 under an account-wide CloudWatch Logs resource policy; neither belongs to one cluster's platform. Enable them with the account's other logging.
  name    = local.zone_name
  comment = "Delegated from ${var.parent_domain} to Karrots"
  tags    = local.tags
}

# The delegation: one NS record in the primary zone, written through karrots-root-dns, the
# only thing that role may do in the main account.
resource "aws_route53_record" "delegation" {
  provider = aws.root_dns

  zone_id = var.parent_zone_id
  name    = local.zone_name
  type    = "NS"
  ttl     = 300
  records = aws_route53_zone.cluster.name_servers
}
