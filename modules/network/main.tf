locals {
  tags = merge(var.tags, { "karrots:module" = "network" })
}

resource "aws_vpc" "main" {
  cidr_block           = var.cidr_block
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = merge(local.tags, { Name = var.name })
}

# One /20 (for a /16 VPC) per availability zone, in zone order.
resource "aws_subnet" "private" {
  count = length(var.availability_zones)

  vpc_id            = aws_vpc.main.id
  availability_zone = var.availability_zones[count.index]
  cidr_block        = cidrsubnet(var.cidr_block, 4, count.index)

  tags = merge(local.tags, { Name = "${var.name}-private-${var.availability_zones[count.index]}" })
}
