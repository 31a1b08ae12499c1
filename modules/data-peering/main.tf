locals {
  tags = merge(var.tags, { "karrots:module" = "data-peering" })
}

# The request from the Karrots VPC; it is accepted by hand in the data account (seed).
resource "aws_vpc_peering_connection" "data" {
  vpc_id        = var.vpc_id
  peer_vpc_id   = var.data_vpc_id
  peer_owner_id = var.data_account_id
  auto_accept   = false

  tags = merge(local.tags, { Name = "${var.name}-to-data" })
}

resource "aws_route" "to_data" {
  count = var.peering_accepted ? length(var.route_table_ids) : 0

  route_table_id            = var.route_table_ids[count.index]
  destination_cidr_block    = var.data_vpc_cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.data.id
}

# In the data account, through karrots-peering: the way back, and the database's door.
resource "aws_route" "from_data" {
  provider = aws.data
  count    = var.peering_accepted ? length(var.data_route_table_ids) : 0

  route_table_id            = var.data_route_table_ids[count.index]
  destination_cidr_block    = var.vpc_cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.data.id
}

resource "aws_security_group_rule" "karrots_to_database" {
  provider = aws.data

  type              = "ingress"
  description       = "Karrots clusters (${var.name}) over the VPC peering"
  security_group_id = var.data_security_group_id
  protocol          = "tcp"
  from_port         = var.database_port
  to_port           = var.database_port
  cidr_blocks       = [var.vpc_cidr_block]
}
