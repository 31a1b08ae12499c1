locals {
  tags      = merge(var.tags, { "karrots:module" = "dns" })
  zone_name = "${var.name}.${var.parent_domain}"
}

# The cluster's own zone lives in the karrots account.
resource "aws_route53_zone" "cluster" {
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
