output "zone_id" {
  description = "Route53 ID of the cluster's zone."
  value       = aws_route53_zone.cluster.zone_id
}

output "zone_name" {
  description = "The cluster's domain, <name>.<parent_domain>."
  value       = aws_route53_zone.cluster.name
}

output "name_servers" {
  description = "Name servers of the cluster's zone, as delegated in the primary zone."
  value       = aws_route53_zone.cluster.name_servers
}
