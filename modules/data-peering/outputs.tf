output "peering_connection_id" {
  description = "ID of the peering connection, to accept in the data account."
  value       = aws_vpc_peering_connection.data.id
}

output "peering_status" {
  description = "Status of the peering connection (pending-acceptance until accepted)."
  value       = aws_vpc_peering_connection.data.accept_status
}
